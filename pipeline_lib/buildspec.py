"""What to build: one validated record that the CLI, the Prefect UI form and deployments share.

``BuildSpec`` is a pydantic model, so Prefect renders it as a form for a deployment's
parameters and rejects bad values with a message naming the field. Everything has a default
except the model name: ``BuildSpec(model="alpaca-plus-7b")`` is a complete build of the
catalog's Alpaca-Plus 7B with the default sources, outputs and quantization types.

The pseudo-model ``tiny-demo`` names the synthetic release of ``pipeline_lib.demo`` (built
locally, offline); ``custom`` builds the ``base`` and ``loras`` given (named ``name``); any other
name must be in ``pipeline_lib.catalog`` (display and deployment names are accepted too).
Choices are enums, defaults are plain values and every field has a title and a description, so
the JSON schema Prefect renders as the Custom-run form guides the user. A new ``X | None`` field
takes ``json_schema_extra=_plain_when_empty`` (or ``_switch(...)`` for an object or an enum): see
the notes above those helpers, docs/orchestration.md ("The form") and docs/ui/screenshots.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

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


# ------------------------------------------------------------------ how the Prefect form draws nullable fields
#
# Pydantic writes ``X | None = None`` as ``anyOf: [X, {"type": "null"}], default: null``. Both Prefect
# UIs draw that as a switch of two tabs labelled by type ("str | None"), set to None over the text
# 'Property is type "None"'. Two shapes read better; either way the server still accepts an
# explicit null (what ``run_deployment(parameters={"spec": BuildSpec(...)})`` sends for every
# override left empty) and what the form sends with the field left alone:
# * a string, number or list override is written as plain X, not required and with no default (as
#   pydantic V1 wrote Optional fields): the forms draw an empty input that sends nothing while left
#   empty, so the default None applies. Prefect's server widens every optional typed property
#   without a default to X-or-null before it validates parameters
#   (prefect.utilities.schema_tools.validation.preprocess_schema), so null stays valid.
# * an override that is an object or an enum keeps the switch, with both tabs titled by what they
#   mean ("Catalog's | Source") and the empty choice first. Left untouched, a plain object would
#   be sent half-filled (its sha256 map) and refused; a null added to an enum makes the V2 form
#   draw a text box instead of a choice, and without it the server would refuse an explicit null.


def _plain_when_empty(schema: dict[str, Any]) -> None:
    """json_schema_extra of an ``X | None = None`` field: written as X, optional, with no default."""
    options = schema.pop("anyOf")
    (kept,) = (o for o in options if o.get("type") != "null")
    if schema.pop("default", None) is not None:
        raise TypeError("_plain_when_empty is for fields whose default is None")
    schema.update({k: v for k, v in kept.items() if k not in schema})


def _switch(none_title: str, value_title: str | None = None, *,
            none_description: str | None = None) -> Callable[[dict[str, Any]], None]:
    """json_schema_extra of a nullable field drawn as a switch: its tabs titled by what they mean,
    the null one first when null is the default. ``value_title`` None keeps a model's own title."""

    def extra(schema: dict[str, Any]) -> None:
        (value,) = (o for o in schema["anyOf"] if o.get("type") != "null")
        if value_title is not None:
            value = {**value, "title": value_title}
        none = {"type": "null", "title": none_title} | ({"description": none_description} if none_description else {})
        schema["anyOf"] = [none, value] if schema.get("default", 0) is None else [value, none]

    return extra


def _without_nulls(schema: dict[str, Any]) -> None:
    """json_schema_extra of a sub-model field: its default object lists no null (empty) values, so a
    form pre-filled from it sends none either."""
    if isinstance(schema.get("default"), dict):
        schema["default"] = {k: v for k, v in schema["default"].items() if v is not None}


def _choices(value: object, allowed: tuple[str, ...], *, what: str, ignore_case: bool = False) -> object:
    """A list of choices, each one of ``allowed`` (spelled as there), without repeats; a message that
    names the bad one and the closest choice otherwise. Anything but a list is left to pydantic."""
    if not isinstance(value, list | tuple):
        return value
    by_key = {(t.lower() if ignore_case else t): t for t in allowed}
    out = []
    for t in value:
        key = t.lower() if ignore_case and isinstance(t, str) else t
        if not isinstance(t, str) or key not in by_key:
            raise ValueError(f"unknown {what} {t!r}{_did_you_mean(str(key), tuple(by_key))}; "
                             f"choose from {', '.join(allowed)}")
        out.append(by_key[key])
    return list(dict.fromkeys(out))


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
    revision: str | None = Field(None, title="Revision", description="hub branch, tag or commit; empty: main",
                                 json_schema_extra=_plain_when_empty)
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
                                   "minutes each for a 7B f16 on 2 cores); 'Whole text': all of it",
                                   json_schema_extra=_switch("Whole text", "Count"))
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
                                "physical cores this process may use", json_schema_extra=_plain_when_empty)
    text: str | None = Field(None, title="Evaluation text", description="a UTF-8 text file; empty: the packaged "
                             "held-out Chinese and English text", json_schema_extra=_plain_when_empty)
    gates: dict[str, dict[str, float]] | None = Field(
        None, title="Quality gates", description="variant -> {metric: limit} with metrics max_mean_kl, min_top1, "
        "max_ppl_ratio, e.g. {\"q4_0\": {\"max_mean_kl\": 0.1}}; a failed gate fails the build. Empty: "
        "llama.cpp's published KL ranges for catalog models (none for tiny-demo/custom); an entry replaces a "
        "variant's default ({} turns it off)",
        json_schema_extra=_switch("Defaults", "Set", none_description="llama.cpp's published KL ranges for catalog "
                                  "models; none for tiny-demo and custom builds"))

    @field_validator("gates")
    @classmethod
    def _gates(cls, value: dict[str, dict[str, float]] | None) -> dict[str, dict[str, float]] | None:
        from .gates import validate

        return None if value is None else validate(value)


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
                                    description="perplexity, KL and speed of each GGUF variant, and samples",
                                    json_schema_extra=_without_nulls)
    out_dir: str | None = Field(None, title="Output folder", description="where the finished build is "
                                "published; empty: $ZHLLAMA_HOME/builds/MODEL", json_schema_extra=_plain_when_empty)
    base: SourceSpec | None = Field(None, title="Base model source", description="override the catalog's base "
                                    "LLaMA (a hub repo, a local folder, a URL or an archive)",
                                    json_schema_extra=_switch("Catalog's", none_description="the base LLaMA of the "
                                                              "catalog (or of the demo), with its official SHA256"))
    loras: list[SourceSpec] | None = Field(None, title="LoRA sources", description="override the catalog's LoRAs, "
                                           "in merge order (LLaMA-Plus first for Plus/Pro Alpaca); no items: the "
                                           "catalog's", json_schema_extra=_plain_when_empty)
    chinese_sp: SourceSpec | None = Field(None, title="chinese_sp.model source", description="the Chinese "
                                          "sentencepiece model the tokenizer is merged from",
                                          json_schema_extra=_switch("Release's", none_description="the release's "
                                                                    "chinese_sp.model, with its official SHA256"))
    tokenizer: TokenizerName | None = Field(None, title="Tokenizer kind", description="llama (49953 pieces) or "
                                            "alpaca (49954, with [PAD])",
                                            json_schema_extra=_switch("Model's", "Choose", none_description="llama "
                                                                      "for the LLaMA models, alpaca for the Alpaca "
                                                                      "ones"))
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
                             description="name of a custom build (files and folder are named after it)",
                             json_schema_extra=_plain_when_empty)
    runner: RunnerName = Field("threads", title="Task runner",
                               description="threads: the stages run in this flow run's process; dask: on a Dask "
                               "cluster (the one at the Dask scheduler address, else a local cluster of Dask worker "
                               "processes), at most one memory-heavy stage per Dask worker")
    dask_address: str | None = Field(None, pattern=r"^(tcp|tls|inproc|ucx)://\S+$", title="Dask scheduler address",
                                     description="tcp://HOST:8786 of a running Dask cluster (workers started with "
                                     "--resources memory_heavy=1); empty: a local cluster", json_schema_extra=_plain_when_empty)
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
        return _choices(value, QUANT_TYPES, what="quantization type", ignore_case=True)

    @field_validator("ggml_types", mode="before")
    @classmethod
    def _ggml_types(cls, value: object) -> object:
        return _choices(value, GGML_TYPES, what="legacy GGML type")

    @model_validator(mode="after")
    def _consistent(self) -> BuildSpec:
        if self.model == CUSTOM_MODEL and (self.base is None or not self.loras):
            raise ValueError("a custom build needs both base and loras (in merge order)")
        # Asking for quantization types without GGUF output is a contradiction; the default types
        # simply do not apply to a build that writes only a checkpoint.
        if "gguf" not in self.outputs and self.quant_types and "quant_types" in self.model_fields_set:
            raise ValueError("quant_types needs 'gguf' in outputs (quantization starts from the GGUF file)")
        gates = self.evaluation.gates or {}
        unknown = [v for v in gates if v not in self.quant_types]
        if unknown:
            raise ValueError(f"evaluation.gates names {', '.join(map(repr, unknown))}, which this build does not "
                             f"quantize to (quant_types: {', '.join(self.quant_types) or 'none'}); gates apply to "
                             "the quantized variants, measured against the float reference")
        if any(gates.values()) and not (self.evaluation.enabled and "gguf" in self.outputs):
            raise ValueError("evaluation.gates needs the evaluation (evaluation.enabled and 'gguf' in outputs): "
                             "a gate checks what the evaluation measured")
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
