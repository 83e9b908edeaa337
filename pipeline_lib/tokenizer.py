"""Tokenizer stage: the Chinese-LLaMA vocabulary merge, byte for byte as the release made it.

Procedure (the release's): load LLaMA's sentencepiece model, append every piece of the Chinese
sentencepiece model that LLaMA lacks, in the Chinese model's order, with ``score = 0`` set
explicitly and the type left at its default, then serialize the model proto. Chinese-Alpaca
appends one more piece, ``[PAD]``, the same way. From the official LLaMA ``tokenizer.model``
(32000 pieces) and ``chinese_sp.model`` this gives the published files (49953 / 49954 pieces).

Proto serialization is canonical (fields in number order), so the output bytes depend only on
the inputs' content, never on which protobuf backend runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from .errors import InputError
from .fsutil import atomic_dir, sha256_bytes, write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

PAD_PIECE = "[PAD]"


class TokenizerKind(StrEnum):
    """Which published tokenizer a build needs."""

    LLAMA = "llama"  # Chinese-LLaMA: LLaMA + Chinese pieces (49953 with the real inputs)
    ALPACA = "alpaca"  # Chinese-Alpaca: the above + [PAD] (49954)


# Special tokens written beside tokenizer.model, per kind (data, not branches).
SPECIAL_TOKENS: dict[TokenizerKind, dict[str, str]] = {
    TokenizerKind.LLAMA: {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    TokenizerKind.ALPACA: {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": PAD_PIECE},
}


@dataclass(frozen=True)
class TokenizerMergeResult:
    out_dir: Path
    tokenizer_model: Path
    kind: TokenizerKind
    llama_pieces: int
    added_pieces: int
    total_pieces: int
    sha256: str


def _model_proto():
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    return sp_pb2.ModelProto()


def load_proto(path: str | Path):
    """Parse a sentencepiece model file; a clear error if it is not one."""
    import sentencepiece as spm

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise InputError(f"no sentencepiece model at {path}",
                         fix="pass the path of a tokenizer.model file (or the folder holding it)")
    try:
        # Load through sentencepiece itself, as the release's script did, then re-parse its
        # serialized proto: this validates the model and normalises its serialization.
        sp = spm.SentencePieceProcessor(model_file=str(path))
        data = sp.serialized_model_proto()
    except Exception as exc:  # sentencepiece raises RuntimeError/OSError with C++ text
        raise InputError(f"{path} is not a readable sentencepiece model ({exc})",
                         expected="a tokenizer.model / *.model file written by sentencepiece",
                         fix="check that the file is complete (run `zhllama verify` on it)") from exc
    proto = _model_proto()
    proto.ParseFromString(data)
    return proto


def merge_protos(llama, chinese, *, alpaca: bool = False):
    """Return a new proto: ``llama`` plus every piece of ``chinese`` it lacks (score 0), plus [PAD]."""
    merged = _model_proto()
    merged.CopyFrom(llama)
    have = {p.piece for p in merged.pieces}
    for p in chinese.pieces:
        if p.piece in have:
            continue
        new = merged.pieces.add()
        new.piece = p.piece
        new.score = 0  # set explicitly: the field is then serialized, as in the release's files
        have.add(p.piece)
    if alpaca:
        if PAD_PIECE in have:
            raise InputError(f"the merged vocabulary already holds {PAD_PIECE}",
                             expected="a Chinese-LLaMA tokenizer without [PAD] as the starting point",
                             fix="pass the original LLaMA tokenizer, not an Alpaca one")
        pad = merged.pieces.add()
        pad.piece = PAD_PIECE
        pad.score = 0
    return merged


def merge_tokenizers(
    llama_tokenizer: str | Path,
    chinese_sp: str | Path,
    *,
    out: str | Path,
    kind: TokenizerKind | str = TokenizerKind.LLAMA,
) -> TokenizerMergeResult:
    """Merge ``llama_tokenizer`` (file or folder) with ``chinese_sp`` into ``out/``.

    Writes ``tokenizer.model``, ``tokenizer_config.json`` and ``special_tokens_map.json``
    atomically (the folder appears complete or not at all). Idempotent: the same inputs give
    the same bytes. Raises InputError if the LLaMA model already contains the Chinese pieces.
    """
    kind = TokenizerKind(kind)
    llama = load_proto(llama_tokenizer)
    chinese = load_proto(chinese_sp)
    llama_pieces = {p.piece for p in llama.pieces}
    chinese_new = [p.piece for p in chinese.pieces if p.piece not in llama_pieces]
    if not chinese_new:
        raise InputError(
            f"{llama_tokenizer} already contains every piece of {chinese_sp} ({len(llama.pieces)} pieces)",
            expected="the original LLaMA tokenizer (32000 pieces) as --llama-tokenizer",
            fix="you probably passed an already merged Chinese tokenizer; use LLaMA's own tokenizer.model",
        )
    merged = merge_protos(llama, chinese, alpaca=kind is TokenizerKind.ALPACA)
    data = merged.SerializeToString()
    out = Path(out)
    with atomic_dir(out, replace=True) as tmp:
        write_bytes_atomic(tmp / "tokenizer.model", data)
        write_hf_tokenizer_files(tmp, kind=kind)
    result = TokenizerMergeResult(
        out_dir=out,
        tokenizer_model=out / "tokenizer.model",
        kind=kind,
        llama_pieces=len(llama.pieces),
        added_pieces=len(merged.pieces) - len(llama.pieces),
        total_pieces=len(merged.pieces),
        sha256=sha256_bytes(data),
    )
    log.info("merged tokenizer: %d + %d = %d pieces, sha256 %s", result.llama_pieces,
             result.added_pieces, result.total_pieces, result.sha256)
    return result


def write_hf_tokenizer_files(folder: Path, *, kind: TokenizerKind) -> None:
    """Write tokenizer_config.json and special_tokens_map.json for transformers' LlamaTokenizer.

    ``legacy: true`` keeps the 2023 tokenization (sentencepiece's own dummy-prefix handling),
    which is what the released models were trained with and what llama.cpp reproduces.
    """
    special = SPECIAL_TOKENS[kind]
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "model_max_length": 1000000000000000019884624838656,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "sp_model_kwargs": {},
        **special,
    }
    write_text_atomic(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(folder / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")


def piece_count(path: str | Path) -> int:
    """Number of pieces in a sentencepiece model (file or folder)."""
    return len(load_proto(path).pieces)


# ---------------------------------------------------------------- tokenizer statistics


@dataclass(frozen=True)
class TokenizerStats:
    tokenizer: str
    vocab_size: int
    chars: int
    tokens: int

    @property
    def chars_per_token(self) -> float:
        return self.chars / self.tokens if self.tokens else 0.0


def tokenizer_stats(text: str, tokenizers: list[str | Path]) -> list[TokenizerStats]:
    """Tokens needed for ``text`` by each sentencepiece tokenizer (no BOS), as the release compared."""
    import sentencepiece as spm

    out = []
    for t in tokenizers:
        path = Path(t)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise InputError(f"no tokenizer at {t}", fix="pass a tokenizer.model file or a folder holding one")
        sp = spm.SentencePieceProcessor(model_file=str(path))
        n = sum(len(sp.encode(line)) for line in text.splitlines() if line)
        chars = sum(len(line) for line in text.splitlines() if line)
        out.append(TokenizerStats(tokenizer=str(t), vocab_size=sp.get_piece_size(), chars=chars, tokens=n))
    return out


# ---------------------------------------------------------------- the build's tokenizer


# What a LoRA folder of the release ships beside its tokenizer.model (copied when nothing is merged).
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                                    "added_tokens.json")


def kind_of(model: str | Path) -> TokenizerKind:
    """Which published tokenizer a sentencepiece model is: Alpaca's ends with ``[PAD]``."""
    proto = load_proto(model)
    return TokenizerKind.ALPACA if proto.pieces[len(proto.pieces) - 1].piece == PAD_PIECE else TokenizerKind.LLAMA


@dataclass(frozen=True)
class TokenizerCheck:
    """The build's tokenizer and how it compares with the tokenizer each LoRA ships."""

    out_dir: Path
    kind: TokenizerKind
    merged: bool  # made by the merge (False: copied from the last LoRA, nothing to merge from)
    loras: tuple[dict, ...]  # per LoRA: lora, kind, pieces, shipped_sha256, merged_sha256, status

    def to_json(self) -> dict:
        return {"kind": self.kind.value, "merged": self.merged, "loras": [dict(r) for r in self.loras]}


def build_tokenizer(llama_tokenizer: str | Path, *, loras: list[Path], chinese_sp: Path | None,
                    kind: TokenizerKind | str, out: str | Path) -> TokenizerCheck:
    """The tokenizer a build ships, checked byte for byte against the one every LoRA folder ships.

    With ``chinese_sp``: both published tokenizers are merged from LLaMA's and ``chinese_sp`` and
    each LoRA's shipped ``tokenizer.model`` must equal the merged one of its kind (IntegrityError
    otherwise: a base that is not the original LLaMA, or a LoRA folder that is not the release's);
    ``out`` gets the merged tokenizer of ``kind``. Without it, ``out`` gets the last LoRA's
    tokenizer files and each row says 'not merged'.
    """
    from tempfile import TemporaryDirectory

    from .errors import IntegrityError
    from .fsutil import sha256_file

    kind = TokenizerKind(kind)
    out = Path(out)
    rows: list[dict] = []
    with TemporaryDirectory(prefix=".tmp-tokenizer-", dir=out.parent) as work:
        merged: dict[TokenizerKind, TokenizerMergeResult] = {}
        if chinese_sp is not None:
            merged = {k: merge_tokenizers(llama_tokenizer, chinese_sp, out=Path(work) / k.value, kind=k)
                      for k in TokenizerKind}
        for i, lora in enumerate(loras):
            shipped = Path(lora) / "tokenizer.model"
            if not shipped.is_file():
                rows.append({"lora": i, "kind": None, "status": "no tokenizer shipped"})
                continue
            lkind = kind_of(shipped)
            row = {"lora": i, "kind": lkind.value, "pieces": piece_count(shipped), "shipped_sha256": sha256_file(shipped)}
            if merged:
                row["merged_sha256"] = merged[lkind].sha256
                row["status"] = "identical" if row["merged_sha256"] == row["shipped_sha256"] else "DIFFERENT"
            else:
                row["status"] = "not merged (no chinese_sp source)"
            rows.append(row)
        bad = next((r for r in rows if r.get("status") == "DIFFERENT"), None)
        if bad is not None:
            raise IntegrityError(
                f"the tokenizer merged from LLaMA's and chinese_sp.model differs from the one LoRA {bad['lora']} "
                f"ships ({bad['kind']}: merged {bad['merged_sha256'][:16]}…, shipped {bad['shipped_sha256'][:16]}…)",
                expected="byte-identical tokenizers (the release's merge is deterministic)",
                fix="check that the base is the original LLaMA (its tokenizer.model) and the LoRAs are the release's")
        with atomic_dir(out, replace=True) as tmp:
            if merged:
                for p in merged[kind].out_dir.iterdir():
                    write_bytes_atomic(tmp / p.name, p.read_bytes())
            else:
                if not loras:
                    raise InputError("no tokenizer to build: no chinese_sp.model source and no LoRA",
                                     fix="give a chinese_sp source or at least one LoRA folder with its tokenizer")
                for name in TOKENIZER_FILES:
                    if (Path(loras[-1]) / name).is_file():
                        write_bytes_atomic(tmp / name, (Path(loras[-1]) / name).read_bytes())
    return TokenizerCheck(out_dir=out, kind=kind, merged=bool(merged), loras=tuple(rows))
