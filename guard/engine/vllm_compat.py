"""What the guard needs of vLLM, checked by feature rather than by version.

The vLLM engine works with any vLLM that has the classes, fields and methods listed in
:data:`NEEDS` (each with why the guard needs it). :func:`check_front_end` probes those of the front
end (the process that runs ``AsyncLLM``) when the engine starts and refuses, naming what is missing,
anything that lacks one; the model runner's are probed on the runner itself, inside vLLM's worker
(:func:`guard.engine.vllm_worker.runner_kind`), because they are instance attributes.

The same table is checked against vLLM's *source* by the tests (:func:`missing_in_source`, a
static read of the files: nothing is imported), so a vLLM that cannot run here (0.33's CUDA wheel,
Model Runner V2) is still held to it.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from guard.errors import ModelLoadError


@dataclass(frozen=True)
class Need:
    """Members one vLLM class (or module) must have."""

    module: str
    """Module that defines it (``vllm.x.y``)."""
    name: str | None
    """Class name; ``None``: module-level functions or classes."""
    members: tuple[str, ...]
    """Methods, properties, fields, enum members, TypedDict keys, or ``self.x`` attributes."""
    why: str
    """What the guard does with it (in the refusal message)."""
    where: str = "front"
    """``front``: probed when the engine starts; ``front_v2``: too, when vLLM will run Model Runner
    V2; ``runner_v1``/``runner_v2``/``worker``: probed on the live objects inside vLLM's worker
    (instance attributes)."""


NEEDS: tuple[Need, ...] = (
    Need(
        "vllm.v1.engine.async_llm",
        "AsyncLLM",
        ("from_vllm_config", "generate", "abort", "collective_rpc", "shutdown"),
        "runs vLLM in-process and talks to its workers",
    ),
    Need(
        "vllm.v1.engine.core_client",
        "AsyncMPClient",
        ("call_utility_all_async",),
        "the worker counters of every data-parallel engine core (collective_rpc answers with the first's)",
    ),
    Need(
        "vllm.engine.arg_utils",
        "EngineArgs",
        (
            "model",
            "tokenizer",
            "max_model_len",
            "enforce_eager",
            "dtype",
            "gpu_memory_utilization",
            "max_num_seqs",
            "seed",
            "enable_prefix_caching",
            "worker_extension_cls",
            "block_size",
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "data_parallel_size",
            "distributed_executor_backend",
            "create_engine_config",
        ),
        "engine settings: the worker extension that hooks the model, the parallel layout",
    ),
    Need(
        "vllm.config.vllm",
        "VllmConfig",
        ("use_v2_model_runner", "model_config", "parallel_config"),
        "which model runner (and so which logits-processor interface) vLLM will run",
    ),
    Need(
        "vllm.config.model",
        "ModelConfig",
        ("logits_processors",),
        "registers the guard's logits processor (forces the reset token)",
    ),
    Need(
        "vllm.sampling_params",
        "SamplingParams",
        (
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "max_tokens",
            "ignore_eos",
            "detokenize",
            "stop_token_ids",
            "logit_bias",
            "output_kind",
            "logprobs",
            "extra_args",
        ),
        "per-request guard arguments travel in extra_args; the reset token is a stop token",
    ),
    Need("vllm.sampling_params", "RequestOutputKind", ("DELTA",), "streams token deltas"),
    Need(
        "vllm.inputs.llm",
        "TokensPrompt",
        ("prompt_token_ids", "cache_salt"),
        "resubmits token ids (never re-tokenised text) with a prefix-cache salt",
    ),
    Need(
        "vllm.v1.sample.logits_processor.interface",
        "LogitsProcessor",
        ("validate_params", "is_argmax_invariant", "update_state", "apply"),
        "the V1 runner's logits-processor interface",
    ),
    Need(
        "vllm.v1.sample.logits_processor.interface",
        "BatchUpdate",
        ("removed", "added", "moved"),
        "the V1 runner's batch updates",
    ),
    Need(
        "vllm.v1.worker.gpu.sample.logits_processor.interface",
        "LogitsProcessor",
        ("validate_params", "add_request", "apply_staged_writes", "apply"),
        "Model Runner V2's logits-processor interface",
        where="front_v2",
    ),
    Need(
        "vllm.v1.worker.gpu.sample.logits_processor.interface",
        "LogitsContext",
        ("idx_mapping_np", "expanded_idx_mapping", "pos"),
        "Model Runner V2's rows -> request slots and positions, in the logits processor",
        where="front_v2",
    ),
    Need(
        "vllm.v1.worker.gpu_model_runner",
        "GPUModelRunner",
        ("input_batch", "query_start_loc", "requests", "get_model"),
        "the V1 runner's batch (rows -> requests) and model",
        where="runner_v1",
    ),
    Need(
        "vllm.v1.worker.gpu_input_batch",
        "InputBatch",
        ("req_ids", "num_reqs"),
        "the V1 runner's rows -> requests",
        where="runner_v1",
    ),
    Need(
        "vllm.v1.utils",
        "CpuGpuBuffer",
        ("np",),
        "the V1 runner's query_start_loc on the host",
        where="runner_v1",
    ),
    Need(
        "vllm.v1.worker.gpu_input_batch",
        "CachedRequestState",
        ("sampling_params",),
        "a V1 request's guard arguments",
        where="runner_v1",
    ),
    Need(
        "vllm.v1.worker.gpu.model_runner",
        "GPUModelRunner",
        ("req_states", "prepare_inputs", "add_requests", "get_model"),
        "Model Runner V2's per-step batch and model",
        where="runner_v2",
    ),
    Need(
        "vllm.v1.worker.gpu.states",
        "RequestState",
        ("req_id_to_index",),
        "V2's live requests",
        where="runner_v2",
    ),
    Need(
        "vllm.v1.worker.gpu.input_batch",
        "InputBatch",
        ("req_ids", "num_reqs", "query_start_loc_np"),
        "V2's rows -> requests",
        where="runner_v2",
    ),
    Need(
        "vllm.v1.core.sched.output",
        "NewRequestData",
        ("req_id", "sampling_params"),
        "a V2 request's guard arguments",
        where="runner_v2",
    ),
    Need(
        "vllm.v1.core.sched.output",
        "SchedulerOutput",
        ("scheduled_new_reqs",),
        "V2's new requests",
        where="runner_v2",
    ),
    Need(
        "vllm.distributed.parallel_state",
        None,
        ("get_tp_group", "get_pp_group"),
        "which tensor-parallel rank reports scores, which pipeline stage holds a layer",
        where="worker",
    ),
    Need(
        "vllm.distributed.parallel_state",
        "GroupCoordinator",
        ("rank_in_group", "world_size"),
        "ranks within the tensor- and pipeline-parallel groups",
        where="worker",
    ),
    Need(
        "vllm.model_executor.models.utils",
        "PPMissingLayer",
        (),
        "the placeholder of a decoder layer another pipeline stage holds",
        where="worker",
    ),
)


def live_members(obj: object) -> set[str]:
    """Names an imported class (or module) offers: attributes, dataclass/msgspec fields, enum
    members and TypedDict keys."""
    names = set(dir(obj))
    if dataclasses.is_dataclass(obj):
        names |= {f.name for f in dataclasses.fields(obj)}
    names |= set(getattr(obj, "__struct_fields__", ()))  # msgspec.Struct
    names |= set(getattr(obj, "__required_keys__", ())) | set(getattr(obj, "__optional_keys__", ()))
    for cls in getattr(obj, "__mro__", ()):
        names |= set(getattr(cls, "__annotations__", {}))
    return names


def missing_live(
    needs: tuple[Need, ...] = NEEDS, where: Callable[[str], bool] = lambda w: w == "front"
) -> list[str]:
    """The needs (of the places ``where`` selects) the installed vLLM lacks, one line each."""
    out = []
    for need in needs:
        if not where(need.where):
            continue
        label = f"{need.module}.{need.name}" if need.name else need.module
        try:
            obj = importlib.import_module(need.module)
            if need.name is not None:
                obj = getattr(obj, need.name)
        except (ImportError, AttributeError) as exc:
            out.append(f"{label} ({need.why}): cannot import: {exc}")
            continue
        lacking = [m for m in need.members if m not in live_members(obj)]
        if lacking:
            out.append(f"{label} ({need.why}): no {', '.join(lacking)}")
    return out


def check_front_end(runner_v2: bool = False) -> None:
    """Refuse (ModelLoadError naming every missing feature) a vLLM that lacks what the front end
    uses; ``runner_v2``: also Model Runner V2's logits-processor interface."""
    import vllm

    places = {"front", "front_v2"} if runner_v2 else {"front"}
    missing = missing_live(where=lambda w: w in places)
    if missing:
        raise ModelLoadError(
            f"vLLM {vllm.__version__} lacks what the guard's vLLM engine uses:\n  "
            + "\n  ".join(missing)
        )


# -- static check against a source tree (tests) --------------------------------------------------


def missing_in_source(
    read: Callable[[str], str | None], needs: tuple[Need, ...] = NEEDS
) -> list[str]:
    """The needs a vLLM *source tree* lacks, read statically (nothing imported). ``read(path)`` returns
    the text of ``vllm/...py`` (a path inside the tree or the wheel) or ``None`` if there is none."""
    out = []
    for need in needs:
        path = need.module.replace(".", "/")
        text = read(f"{path}.py")
        if text is None:
            text = read(f"{path}/__init__.py")
        if text is None:
            out.append(f"{need.module}: no such module")
            continue
        tree = ast.parse(text)
        have = _module_names(tree) if need.name is None else _class_members(tree, need.name)
        if have is None:
            out.append(f"{need.module}.{need.name}: no such class")
            continue
        lacking = [m for m in need.members if m not in have]
        if lacking:
            out.append(f"{need.module}.{need.name or ''}: no {', '.join(lacking)}")
    return out


def source_reader(root: Path) -> Callable[[str], str | None]:
    """A ``read`` for :func:`missing_in_source` over a directory holding ``vllm/``."""

    def read(rel: str) -> str | None:
        p = root / rel
        return p.read_text() if p.is_file() else None

    return read


def _module_names(tree: ast.Module) -> set[str]:
    return {
        n.name
        for n in tree.body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    }


def _class_members(
    tree: ast.Module, name: str, seen: frozenset[str] = frozenset()
) -> set[str] | None:
    """Members a class defines in its body or assigns to ``self`` in its methods, plus those of its
    bases defined in the same module; ``None`` if the module has no such class."""
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    cls = classes.get(name)
    if cls is None:
        return None
    have: set[str] = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            have.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            have.add(node.target.id)
        elif isinstance(node, ast.Assign):
            have |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    for sub in ast.walk(cls):
        targets = (
            sub.targets
            if isinstance(sub, ast.Assign)
            else ([sub.target] if isinstance(sub, ast.AnnAssign) else [])
        )
        for t in targets:
            if (
                isinstance(t, ast.Attribute)
                and isinstance(t.value, ast.Name)
                and t.value.id == "self"
            ):
                have.add(t.attr)
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in classes and base.id not in seen:
            have |= _class_members(tree, base.id, seen | {name}) or set()
    return have
