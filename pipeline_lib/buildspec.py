"""What to build: one validated record that the CLI, the Prefect UI form and deployments share.

``BuildSpec`` is a pydantic model, so Prefect renders it as a form for a deployment's
parameters and rejects bad values with a message naming the field. Everything has a default
except the model name: ``BuildSpec(model="alpaca-plus-7b")`` is a complete build of the
catalog's Alpaca-Plus 7B with the default sources, outputs and quantization types.

The pseudo-model ``tiny-demo`` names the synthetic release of ``pipeline_lib.demo`` (built
locally, offline); any other name must be in ``pipeline_lib.catalog``, unless ``base`` and
``loras`` are given explicitly, which makes a custom build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEMO_MODEL = "tiny-demo"

# The quantization types llama.cpp offers through llama-cpp-python (pipeline_lib.quantize.QUANT_TYPES
# is the authority; tests/test_flow.py checks that this list agrees with it). Kept here as data so
# that validating a spec does not import llama.cpp.
QUANT_TYPES: tuple[str, ...] = (
    "q4_0", "q4_1", "q5_0", "q5_1", "q8_0",
    "q2_K", "q3_K_S", "q3_K_M", "q3_K_L", "q4_K_S", "q4_K_M", "q5_K_S", "q5_K_M", "q6_K",
)
GGML_TYPES: tuple[str, ...] = ("f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0")

OutputFormat = Literal["hf", "pth", "gguf", "ggml"]
OutType = Literal["f16", "f32", "bf16"]
TokenizerName = Literal["llama", "alpaca"]


def _known_models() -> set[str]:
    try:
        from . import catalog
    except ImportError:  # catalog not installed yet: accept any name, checked when the build resolves it
        return set()
    return set(catalog.MODELS)


class SourceSpec(BaseModel):
    """Where one input comes from, and what its files must hash to."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(
        description="hub repo 'owner/name' (or 'hf://owner/name@rev'), a local folder, an http(s) URL "
        "or a .zip/.tar.gz archive",
        min_length=1,
    )
    revision: str | None = Field(None, description="hub branch, tag or commit (default: main)")
    sha256: dict[str, str] = Field(
        default_factory=dict, description="file name -> expected SHA256 (official values; adds to the catalog's)"
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

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(True, description="run the evaluation stage")
    n_ctx: int = Field(512, ge=16, le=32768, description="context length for perplexity chunks")
    max_chunks: int | None = Field(8, ge=1, description="perplexity chunks to score (None: the whole text)")
    generate: bool = Field(True, description="write generation samples for the ten categories")
    samples_per_category: int = Field(1, ge=0, le=50, description="prompts per category to decode")
    max_new_tokens: int = Field(64, ge=1, le=4096)
    text: str | None = Field(None, description="evaluation text file (default: the packaged held-out text)")


class BuildSpec(BaseModel):
    """One build: a catalog model (or the demo, or explicit sources) and what to produce from it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="catalog name such as 'alpaca-plus-7b', or 'tiny-demo'", min_length=1)
    base: SourceSpec | None = Field(None, description="override the base LLaMA source")
    loras: list[SourceSpec] | None = Field(
        None, description="override the LoRA sources, in merge order (same length as the model's chain)"
    )
    chinese_sp: SourceSpec | None = Field(
        None, description="chinese_sp.model for the tokenizer merge check (default: the catalog's, if any)"
    )
    tokenizer: TokenizerName | None = Field(None, description="tokenizer kind (default: the catalog's)")
    outputs: list[OutputFormat] = Field(default_factory=lambda: ["gguf"], min_length=1,
                                        description="what to write: hf, pth, gguf, ggml")
    outtype: OutType = Field("f16", description="GGUF float type before quantization")
    quant_types: list[str] = Field(default_factory=lambda: ["q4_0", "q8_0"],
                                   description="llama.cpp quantization types, one file each")
    ggml_types: list[str] = Field(default_factory=lambda: ["q4_0"], description="legacy GGML types")
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="merged weights' dtype")
    precise: bool = Field(False, title="Precise arithmetic",
                          description="float32 accumulation with one rounding (PEFT's float32 merge) instead of the "
                          "release's fp16 rounding after each LoRA; the merged files then differ from the official "
                          "SHA256")
    evaluation: EvalOptions = Field(default_factory=EvalOptions)
    out_dir: str | None = Field(None, description="folder to publish the results in "
                                "(default: $ZHLLAMA_HOME/builds/<model>)")

    @field_validator("outputs")
    @classmethod
    def _unique_outputs(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @field_validator("quant_types")
    @classmethod
    def _quant_types(cls, value: list[str]) -> list[str]:
        lowered = {t.lower(): t for t in QUANT_TYPES}
        out = []
        for t in value:
            if t.lower() not in lowered:
                raise ValueError(f"unknown quantization type {t!r}; choose from {', '.join(QUANT_TYPES)}")
            out.append(lowered[t.lower()])
        return list(dict.fromkeys(out))

    @field_validator("ggml_types")
    @classmethod
    def _ggml_types(cls, value: list[str]) -> list[str]:
        for t in value:
            if t not in GGML_TYPES:
                raise ValueError(f"unknown legacy GGML type {t!r}; choose from {', '.join(GGML_TYPES)}")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _model_known(self) -> BuildSpec:
        custom = self.base is not None and self.loras is not None
        if self.model != DEMO_MODEL and not custom:
            known = _known_models()
            if known and self.model not in known:
                close = sorted(n for n in known if self.model.split("-")[0] in n)[:6]
                raise ValueError(
                    f"unknown model {self.model!r}; choose a catalog name ({', '.join(close or sorted(known)[:6])}, "
                    f"...; `zhllama catalog` lists all), '{DEMO_MODEL}', or give both base and loras"
                )
        # Asking for quantization types without GGUF output is a contradiction; the default types
        # simply do not apply to a build that writes only a checkpoint.
        if "gguf" not in self.outputs and self.quant_types and "quant_types" in self.model_fields_set:
            raise ValueError("quant_types needs 'gguf' in outputs (quantization starts from the GGUF file)")
        return self

    @property
    def build_name(self) -> str:
        return self.model

    def output_dir(self, home: Path) -> Path:
        return Path(self.out_dir).expanduser() if self.out_dir else home / "builds" / self.model

    @property
    def one_pass(self) -> bool:
        """GGUF straight from the merge stream: no HF/pth checkpoint was asked for."""
        return not ({"hf", "pth"} & set(self.outputs))
