"""What to build: one validated record that the CLI, the Prefect UI form and deployments share.

``BuildSpec`` is a pydantic model, so Prefect renders it as a form for a deployment's
parameters and rejects bad values with a message naming the field. Everything has a default
except the model name: ``BuildSpec(model="alpaca-plus-7b")`` is a complete build of the
catalog's Alpaca-Plus 7B with the default sources, outputs and quantization types.

The pseudo-model ``tiny-demo`` names the synthetic release of ``pipeline_lib.demo`` (built
locally, offline); ``custom`` builds the ``base`` and ``loras`` given (named ``name``); any other
name must be in ``pipeline_lib.catalog`` (display and deployment names are accepted too).
Choices are enums, defaults are plain values and every field has a title and a description, so
the JSON schema Prefect renders as the Custom-run form guides the user.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from . import catalog
from .errors import ZhllamaError

DEMO_MODEL = "tiny-demo"
CUSTOM_MODEL = "custom"  # explicit base + LoRA sources, named by ``BuildSpec.name``

# The quantization types llama.cpp offers through llama-cpp-python (pipeline_lib.quantize.QUANT_TYPES
# is the authority; tests/test_flow.py checks that this list agrees with it). Kept here as data so
# that validating a spec does not import llama.cpp.
QUANT_TYPES: tuple[str, ...] = (
    "q4_0", "q4_1", "q5_0", "q5_1", "q8_0",
    "q2_K", "q3_K_S", "q3_K_M", "q3_K_L", "q4_K_S", "q4_K_M", "q5_K_S", "q5_K_M", "q6_K",
)
GGML_TYPES: tuple[str, ...] = ("f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
MODEL_NAMES: tuple[str, ...] = (*catalog.MODELS, DEMO_MODEL, CUSTOM_MODEL)

# Enums (JSON schema "enum"): the Prefect form offers them as choices, the server refuses others.
ModelName = Literal[MODEL_NAMES]  # type: ignore[valid-type]
QuantType = Literal[QUANT_TYPES]  # type: ignore[valid-type]
GgmlType = Literal[GGML_TYPES]  # type: ignore[valid-type]
OutputFormat = Literal["hf", "pth", "gguf", "ggml"]
RunnerName = Literal["threads", "dask"]
# How a build runs, not what it builds: left out of build-lock.json (the same build by any runner
# publishes the same bytes) and of every cache key.
EXECUTION_FIELDS = frozenset({"runner", "dask_address", "dask_workers"})
OutType = Literal["f16", "f32", "bf16"]
TokenizerName = Literal["llama", "alpaca"]


def _did_you_mean(value: str, choices: tuple[str, ...]) -> str:
    import difflib

    close = difflib.get_close_matches(value, choices, n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


class SourceSpec(BaseModel):
    """Where one input comes from, and what its files must hash to."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="Source")

    source: str = Field(
        title="Source",
        description="hub repo 'owner/name' (or 'hf://owner/name@rev'), a local folder, an http(s) URL "
        "or a .zip/.tar.gz archive",
        min_length=1,
    )
    revision: str | None = Field(None, title="Revision", description="hub branch, tag or commit; empty: main")
    sha256: dict[str, str] = Field(
        {}, title="Expected SHA256",
        description="file name -> expected SHA256 (official values; adds to the catalog's)",
    )

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: dict[str, str]) -> dict[str, str]:
        for name, digest in value.items():
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                raise ValueError(f"sha256 of {name!r} must be 64 hex digits, got {digest!r}")
        return {k: v.lower() for k, v in value.items()}


class EvalOptions(BaseModel):
    """The evaluation stage's knobs (see pipeline_lib.evaluate)."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="Evaluation")

    enabled: bool = Field(True, title="Evaluate", description="run the evaluation stages (perplexity, KL against "
                          "the float model, speed, samples)")
    n_ctx: int = Field(512, ge=16, le=32768, title="Context length",
                       description="tokens per perplexity chunk (llama-perplexity's -c)")
    max_chunks: int | None = Field(1, ge=1, title="Chunks", description="perplexity chunks to score (about 4.5 "
                                   "minutes each for a 7B f16 on 2 cores); empty: the whole text")
    generate: bool = Field(True, title="Generation samples", description="decode sample answers to the packaged "
                           "prompts")
    samples_per_category: int = Field(1, ge=0, le=50, title="Samples per category",
                                      description="prompts decoded per category (0: all of them)")
    max_samples: int = Field(3, ge=0, le=600, title="Samples in all", description="at most this many sample answers, "
                             "round-robin over the ten categories (0: no limit)")
    max_new_tokens: int = Field(32, ge=1, le=4096, title="Max new tokens", description="tokens per sample answer")
    speed_prompt_tokens: int = Field(32, ge=1, le=4096, title="Speed test prompt",
                                     description="prompt tokens processed in one batch by the speed test (pp)")
    speed_gen_tokens: int = Field(16, ge=1, le=4096, title="Speed test generation",
                                  description="tokens generated by the speed test (tg)")
    threads: int | None = Field(None, ge=1, le=512, title="Threads", description="llama.cpp threads; empty: the "
                                "physical cores this process may use")
    text: str | None = Field(None, title="Evaluation text", description="a UTF-8 text file; empty: the packaged "
                             "held-out Chinese and English text")


class BuildSpec(BaseModel):
    """One build: a catalog model (or the demo, or explicit sources) and what to produce from it."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="Build")

    model: ModelName = Field(title="Model", description="the release's model to build (`zhllama catalog` lists "
                             "them); 'tiny-demo' builds the offline demo; 'custom' builds the base and LoRA "
                             "sources given below")
    outputs: list[OutputFormat] = Field(["gguf"], min_length=1, title="Outputs", description="what to write: hf "
                                        "(safetensors), pth (Meta consolidated.NN.pth), gguf (llama.cpp), ggml "
                                        "(legacy ggjt v3 for 2023 tools)", json_schema_extra={"uniqueItems": True})
    quant_types: list[QuantType] = Field(["q4_0", "q8_0"], title="Quantization types",
                                         description="llama.cpp quantizations of the GGUF, one file each",
                                         json_schema_extra={"uniqueItems": True})
    ggml_types: list[GgmlType] = Field(["q4_0"], title="Legacy GGML types",
                                       description="types of the legacy GGML files (with 'ggml' in outputs)",
                                       json_schema_extra={"uniqueItems": True})
    evaluation: EvalOptions = Field(EvalOptions(), title="Evaluation",
                                    description="perplexity, KL and speed of each GGUF variant, and samples")
    out_dir: str | None = Field(None, title="Output folder", description="where the finished build is "
                                "published; empty: $ZHLLAMA_HOME/builds/MODEL")
    base: SourceSpec | None = Field(None, title="Base model source", description="override the catalog's base "
                                    "LLaMA (a hub repo, a local folder, a URL or an archive)")
    loras: list[SourceSpec] | None = Field(None, title="LoRA sources", description="override the catalog's LoRAs, "
                                           "in merge order (LLaMA-Plus first for Plus/Pro Alpaca)")
    chinese_sp: SourceSpec | None = Field(None, title="chinese_sp.model source", description="the Chinese "
                                          "sentencepiece model the tokenizer is merged from; empty: the release's")
    tokenizer: TokenizerName | None = Field(None, title="Tokenizer kind", description="llama (49953 pieces) or "
                                            "alpaca (49954, with [PAD]); empty: the model's")
    outtype: OutType = Field("f16", title="GGUF float type", description="the float GGUF quantizations start from")
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", title="Merged dtype",
                                                             description="dtype of the merged weights")
    precise: bool = Field(False, title="Precise arithmetic",
                          description="float32 accumulation with one rounding (PEFT's float32 merge) instead of the "
                          "release's fp16 rounding after each LoRA; the merged files then differ from the official "
                          "SHA256")
    require_official: bool = Field(False, title="Require the official hashes",
                                   description="fail the build when a merged pth or the tokenizer differs from the "
                                   "release's published SHA256 (else it is reported)")
    name: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", title="Build name",
                             description="name of a custom build (files and folder are named after it)")
    runner: RunnerName = Field("threads", title="Task runner",
                               description="threads: the stages run in this flow run's process; dask: on a Dask "
                               "cluster (the one at the Dask scheduler address, else a local cluster of Dask worker "
                               "processes), at most one memory-heavy stage per Dask worker")
    dask_address: str | None = Field(None, pattern=r"^(tcp|tls|inproc|ucx)://\S+$", title="Dask scheduler address",
                                     description="tcp://HOST:8786 of a running Dask cluster (workers started with "
                                     "--resources memory_heavy=1); empty: a local cluster")
    dask_workers: int = Field(2, ge=1, le=256, title="Dask workers",
                              description="worker processes of the local Dask cluster (runner dask, no address)")

    @field_validator("model", mode="before")
    @classmethod
    def _model_name(cls, value: object) -> object:
        if not isinstance(value, str) or value in MODEL_NAMES:
            return value
        key = value.strip().lower()
        if key in MODEL_NAMES:
            return key
        try:  # display names ('Chinese-Alpaca-Plus-7B') and deployment names ('build-alpaca-plus-7b')
            return catalog.get(key).name
        except ZhllamaError:
            raise ValueError(f"unknown model {value!r}{_did_you_mean(key, MODEL_NAMES)} (`zhllama catalog` lists "
                             f"them; '{DEMO_MODEL}' is the demo; '{CUSTOM_MODEL}' with base and loras builds "
                             "your own chain)") from None

    @field_validator("outputs")
    @classmethod
    def _unique_outputs(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @field_validator("quant_types", mode="before")
    @classmethod
    def _quant_types(cls, value: object) -> object:
        if not isinstance(value, list | tuple):
            return value
        lowered = {t.lower(): t for t in QUANT_TYPES}
        out = []
        for t in value:
            if not isinstance(t, str) or t.lower() not in lowered:
                raise ValueError(f"unknown quantization type {t!r}{_did_you_mean(str(t).lower(), tuple(lowered))}; "
                                 f"choose from {', '.join(QUANT_TYPES)}")
            out.append(lowered[t.lower()])
        return list(dict.fromkeys(out))

    @field_validator("ggml_types", mode="before")
    @classmethod
    def _ggml_types(cls, value: object) -> object:
        if not isinstance(value, list | tuple):
            return value
        for t in value:
            if t not in GGML_TYPES:
                raise ValueError(f"unknown legacy GGML type {t!r}; choose from {', '.join(GGML_TYPES)}")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _consistent(self) -> BuildSpec:
        if self.model == CUSTOM_MODEL and (self.base is None or not self.loras):
            raise ValueError("a custom build needs both base and loras (in merge order)")
        # Asking for quantization types without GGUF output is a contradiction; the default types
        # simply do not apply to a build that writes only a checkpoint.
        if "gguf" not in self.outputs and self.quant_types and "quant_types" in self.model_fields_set:
            raise ValueError("quant_types needs 'gguf' in outputs (quantization starts from the GGUF file)")
        if self.dask_address and self.runner != "dask":
            raise ValueError("dask_address needs runner 'dask'")
        return self

    @property
    def build_name(self) -> str:
        """What the build's files and folder are named after: the model, or a custom build's name."""
        return self.name or self.model

    def output_dir(self, home: Path) -> Path:
        return Path(self.out_dir).expanduser() if self.out_dir else home / "builds" / self.build_name

    @property
    def one_pass(self) -> bool:
        """GGUF straight from the merge stream: no HF/pth checkpoint was asked for."""
        return not ({"hf", "pth"} & set(self.outputs))
