"""Structured-config schema: one dataclass per config group, registered in Hydra's ConfigStore.

OmegaConf enforces the types and rejects unknown keys (a typo such as `finetune.learnign_rate` fails at compose
time, naming the key). Value sets that OmegaConf cannot express for us (string enums like `lr_scheduler_type`, the
integer enum `deepspeed_stage`) are declared as `choices` in the field metadata and checked by `validate()` before
any step runs, so every bad value is refused before money, GPU time or data is spent.

Finetune keys carry the `chat_completion_pipeline` component's input names (recorded in runner/azureml/components/), so a
user of the Azure notebook recognises every key. Keys that only mean something on this machine live under
`finetune.local` and never reach the component.
"""

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from runner.errors import ConfigError  # noqa: F401  (raised by validate(); importable from here as before)
from runner.azure_routes import route_errors
from runner.config_fields import Range, bounded, choice, list_field, non_negative, positive
from runner.paths import state_root
from runner.presets import kind_errors

# Keys of the finetune group that steer the runner and are no component input (never sent as one).
RUNNER_FINETUNE_KEYS = ("local", "route", "attach_job")

STEPS = ["connect", "model", "compute", "data", "finetune", "metrics", "evaluate", "register", "export",
         "deploy", "test", "cleanup"]

SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit unsigned
MIN_SEQ_LENGTH = 2  # one token to read and one to predict: the shortest sequence a causal LM trains on

LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]


@dataclass
class TinyModelConfig:
    """Dimensions of the offline Phi-3-architecture model (model=tiny_phi3)."""

    hidden_size: int = positive(64)
    intermediate_size: int = positive(128)
    num_hidden_layers: int = positive(2)
    num_attention_heads: int = positive(4)
    vocab_size: int = positive(2048)
    max_position_embeddings: int = positive(1024)
    seed: int = bounded(0, 0, SEED_MAX)


@dataclass
class ModelConfig:
    name: str = MISSING  # registry name, e.g. Phi-3-mini-4k-instruct; also names the registered fine-tuned model
    registry: str = "azureml"
    label: str = "latest"
    version: Optional[str] = None  # pin a registry version instead of the label
    hf_id: Optional[str] = None  # Hugging Face id for the local backend
    local_path: Optional[str] = None  # a local folder wins over hf_id
    build_tiny: bool = False  # build the offline tiny model (see runner/local/tiny_model.py)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    trust_remote_code: bool = False
    context_length: int = positive(4096)
    # Tags from the model's registry spec, for offline planning (dry_run) and the local backend.
    archived: bool = False
    finetune_retirement_date: Optional[str] = None
    inference_retirement_date: Optional[str] = None
    replacement_config: Optional[str] = None  # the config to suggest when the model is archived/retired
    finetune_compute_allow_list: List[str] = field(default_factory=list)
    inference_compute_allow_list: List[str] = field(default_factory=list)
    model_specific_defaults: Dict[str, Any] = field(default_factory=dict)
    # regions where the model fine-tuned serverless can be deployed (its registry tag maas-finetuning-deploy-regions,
    # which wins when present): compute=serverless refuses a workspace elsewhere before submitting the job
    serverless_regions: List[str] = field(default_factory=list)
    apply_model_specific_defaults: bool = True
    allow_archived: bool = False  # an archived/retired model is refused before anything is spent unless true
    # The registry facts above (lists, dates, archived, defaults, latest_version) were copied for this model name;
    # they apply only while model.name is this name (null: model.name), never to another model asked for by name.
    facts_for: Optional[str] = None
    # the registry version `label: latest` resolved to when the facts were copied: what a dry run answers for it
    latest_version: Optional[str] = None
    # true when latest_version was not copied from the registry (e.g. from public catalog data): the plan says so
    latest_version_stand_in: bool = False


@dataclass
class ComputeConfig:
    name: str = MISSING  # cluster name (Azure) or a label (local)
    # azure: a cluster in the workspace; local: this machine; serverless: no compute of yours (finetune.route=
    # finetuning_job only: Azure runs the job on its own capacity, billed per token; compute=serverless)
    kind: str = choice("azure", ["azure", "local", "serverless"])
    size: str = MISSING  # VM SKU, e.g. Standard_NC24ads_A100_v4; "cpu"/"cuda" locally
    gpus_per_node: int = non_negative(0)
    # GPU memory of one GPU of the VM size, in GB (A100 80GB -> 80); 0 = unknown (local: measured at run time).
    # Informational: what a model + optimizer state must fit in, per GPU, when choosing a size.
    gpu_memory_gb: int = non_negative(0)
    min_instances: int = non_negative(0)
    max_instances: int = positive(2)
    idle_time_before_scale_down: int = non_negative(120)  # seconds
    tier: str = choice("dedicated", ["dedicated", "low_priority"])
    low_priority_fallback: bool = True  # the notebook retries as low priority when dedicated fails
    # local only: which device to use; "auto" = CUDA when present
    device: str = choice("auto", ["auto", "cpu", "cuda"])
    # fraction of free memory the weights + optimizer state may use
    memory_headroom: float = bounded(0.9, 0, 1, lo_open=True)
    # finetune.route=finetuning_job on managed compute: VM sizes the service may pick from (the job's
    # resources.instance_types) instead of the cluster `name`; empty = the cluster
    instance_types: List[str] = field(default_factory=list)
    # finetune.route=finetuning_job: the job's queue_settings.job_tier (None = the service's default)
    job_tier: Optional[str] = choice(None, [None, "spot", "basic", "standard", "premium"])


# `${ftrun_slug:...}` and `${ftrun_model_name:...}`: the dataset's slug names its folder and the registered model
from runner.data.names import register_name_resolvers  # noqa: E402  (light: re and pathlib only)
from runner.evaluation.names import METRIC_NAMES, evaluate_config_errors  # noqa: E402  (light: no numpy)

register_name_resolvers()


@dataclass
class DatasetColumnsConfig:
    """A source's own column names for the chat fields (runner/data/formats.py), e.g. messages: conversation."""

    messages: Optional[str] = None
    conversations: Optional[str] = None  # ShareGPT
    instruction: Optional[str] = None  # Alpaca
    input: Optional[str] = None
    output: Optional[str] = None
    system: Optional[str] = None
    history: Optional[str] = None
    prompt: Optional[str] = None
    prompt_id: Optional[str] = None


@dataclass
class DatasetConfig:
    name: str = "HuggingFaceH4/ultrachat_200k"  # hub id, or a local folder/file for `datasets`; dataset=local: a label
    source: str = choice("hub", ["hub", "sample", "local"])
    subset: Optional[str] = None
    split_percent: float = bounded(5.0, 0, 100, lo_open=True)  # first N percent of every split, as the notebook
    splits: List[str] = list_field("train_sft", "test_sft", "train_gen", "test_gen")
    train_split: str = "train_sft"
    test_split: str = "test_sft"
    sample_split: str = "test_gen"  # one seeded random row of it becomes the endpoint's sample request
    # names the data folder and the registered model (runner/data/names.py): ultrachat_200k, sample, a file's stem
    slug: str = "${ftrun_slug:${dataset.name}}"
    download_dir: str = "${paths.data_dir}/${dataset.slug}"
    force: bool = False
    on_invalid: str = choice("error", ["error", "skip"])
    seed: int = bounded(42, 0, SEED_MAX)
    sample_rows: Dict[str, int] = field(default_factory=dict)  # source=sample: rows per split
    # the rows' format (runner/data/formats.py); auto: the first row's, and every row must share it
    format: str = choice("auto", ["auto", "messages", "sharegpt", "alpaca"])
    columns: DatasetColumnsConfig = field(default_factory=DatasetColumnsConfig)  # our field -> the source's column
    # source=local (dataset=local): the user's files; without eval_file, eval_percent of the train rows are held out
    train_file: Optional[str] = None
    eval_file: Optional[str] = None
    eval_percent: float = bounded(5.0, 0, 100, lo_open=True, hi_open=True)


@dataclass
class LocalFinetuneConfig:
    """Settings that only mean something to the local trainer (never sent to Azure)."""

    packing: bool = True  # padding-free packing with position ids reset per conversation
    lora_target_modules: List[str] = list_field("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    lora_modules_to_save: List[str] = field(default_factory=list)
    save_steps: int = positive(50)  # checkpoint every N optimizer steps (and at the end)
    eval_before_training: bool = True  # measure the base model's eval loss too
    max_eval_rows: int = non_negative(0)  # 0 = all rows of the test split
    max_train_rows: int = non_negative(0)  # 0 = all rows
    max_tokens_per_batch: int = non_negative(0)  # packing: tokens per micro-batch; 0 = batch size * max_seq_length
    num_gpus: int = non_negative(0)  # 0 = all visible GPUs (multi-GPU runs are launched with torchrun)
    # auto: on only when the compute step's estimate says the micro-batch does not fit without it
    # (runner.memory.terms.use_gradient_checkpointing); true/false force it
    gradient_checkpointing: Any = choice("auto", ["auto", True, False])
    # the micro-batch does not fit: false refuses (printing the largest that fits, with and without checkpointing);
    # true runs the largest that fits, with the gradient accumulation that keeps the effective batch
    auto_fit: bool = False
    # the loss over chunks of tokens (lm_head + log-softmax recomputed per chunk in the backward): the full fp32
    # logits never exist (runner/local/loss.py)
    chunked_loss: bool = False
    # packed batches' attention (runner/local/packing.py): per_conversation = causal SDPA per conversation (CPU and
    # GPU); varlen = one flash-attention varlen kernel per layer over the packed row (CUDA, torch >= 2.10)
    packed_attention: str = choice("per_conversation", ["per_conversation", "varlen"])
    # torch.compile every decoder layer (runner/local/speed.py): GPU kernels fused per layer; the first steps compile
    compile: bool = False


@dataclass
class FinetuneConfig:
    # --- training parameters (component input names) ---
    num_train_epochs: int = positive(1)
    max_steps: int = bounded(-1, -1)  # -1: num_train_epochs decides
    per_device_train_batch_size: int = positive(1)
    per_device_eval_batch_size: int = positive(1)
    auto_find_batch_size: bool = False
    optim: str = choice("adamw_torch", ["adamw_torch", "adafactor"])
    learning_rate: float = positive(2e-5)
    warmup_steps: int = non_negative(0)
    weight_decay: float = non_negative(0.0)
    adam_beta1: float = bounded(0.9, 0, 1, hi_open=True)
    adam_beta2: float = bounded(0.999, 0, 1, hi_open=True)
    adam_epsilon: float = non_negative(1e-8)
    gradient_accumulation_steps: int = positive(1)
    eval_accumulation_steps: int = bounded(-1, -1)  # -1 or 0: not set
    lr_scheduler_type: str = choice("linear", LR_SCHEDULERS)
    seed: int = bounded(42, 0, SEED_MAX)
    enable_full_determinism: bool = False
    dataloader_num_workers: int = non_negative(0)
    ignore_mismatched_sizes: bool = False
    max_grad_norm: float = non_negative(1.0)  # 0: no clipping (as TrainingArguments)
    evaluation_strategy: str = choice("epoch", ["epoch", "steps", "disable"])
    evaluation_steps_interval: float = bounded(0.0, 0, 1)  # a fraction of an epoch; 0: eval_steps decides
    eval_steps: int = positive(500)
    logging_strategy: str = choice("steps", ["epoch", "steps"])
    logging_steps: int = positive(10)
    metric_for_best_model: str = choice("loss", ["loss", "f1", "exact"])
    resume_from_checkpoint: bool = False
    save_total_limit: int = bounded(-1, -1)  # -1 or 0: keep every checkpoint
    apply_early_stopping: bool = False
    early_stopping_patience: int = positive(1)
    early_stopping_threshold: float = non_negative(0.0)
    # --- preprocessing ---
    batch_size: int = positive(1000)
    pad_to_max_length: bool = False
    max_seq_length: int = bounded(-1, MIN_SEQ_LENGTH, special=(-1,))  # -1: the model's limit
    # --- optimization parameters ---
    apply_lora: bool = False
    merge_lora_weights: bool = True
    lora_alpha: int = positive(128)
    lora_r: int = positive(8)
    lora_dropout: float = bounded(0.0, 0, 1, hi_open=True)
    precision: int = choice(32, [32, 16])
    apply_deepspeed: bool = False
    deepspeed_stage: int = choice(2, [2, 3])
    deepspeed: Optional[str] = None  # path to a DeepSpeed JSON config (wins over deepspeed_stage)
    apply_ort: bool = False
    num_nodes_finetune: int = positive(1)
    shm_size_finetune: str = "5g"
    # How Azure fine-tunes (runner/azureml/routes.py): pipeline = the chat_completion_pipeline component on your
    # cluster (the seed notebook); finetuning_job = a `type: finetuning` job (azure.ai.ml.finetuning), on managed
    # compute or serverless. Not a component input, like `local`.
    route: str = choice("pipeline", ["pipeline", "finetuning_job"])
    local: LocalFinetuneConfig = field(default_factory=LocalFinetuneConfig)
    # azureml: continue from this already submitted pipeline job (wait for it, then the later steps) instead of
    # submitting a new one; a from_run whose finetune step was cut short after submitting attaches by itself
    attach_job: Optional[str] = None


@dataclass
class DeploymentConfig:
    # local: this machine's endpoint; managed_online: a managed online endpoint + deployment on a VM size;
    # serverless: a ServerlessEndpoint (pay per token, models fine-tuned serverless). `azure` is the old name of
    # managed_online, still accepted so that configs written before serverless existed keep their meaning.
    kind: str = choice("local", ["local", "managed_online", "serverless", "azure"])
    endpoint_name_prefix: str = "ultrachat-completion-"
    deployment_name: str = "demo"
    traffic: Dict[str, int] = field(default_factory=lambda: {"demo": 100})
    auth_mode: str = choice("key", ["key", "aml_token"])
    instance_type: str = "Standard_NC24ads_A100_v4"  # NCv3 (the notebook's NC6s_v3) is retired
    instance_count: int = positive(1)
    liveness_initial_delay: int = non_negative(600)  # seconds (ProbeSettings.initial_delay)
    request_timeout_ms: int = positive(90000)  # OnlineRequestSettings.request_timeout_ms
    # local endpoint
    host: str = "127.0.0.1"
    port: int = bounded(0, 0, 65535)  # 0 = a free port
    keep_alive: bool = False  # leave the endpoint serving after the test step (until Ctrl-C, SIGTERM or SIGHUP)
    # the server ends by itself when the ftrun that started it dies (SIGKILL, crash); true lets it outlive ftrun.
    # A run without the cleanup step (steps=[deploy]) always leaves its endpoint detached, to be used and deleted later
    detach: bool = False
    # larger request bodies get 413 (by Content-Length, or while reading a chunked one)
    max_request_bytes: int = positive(4194304)
    # local endpoint: per-request limits, checked before tokenizing (400/413 naming the key)
    max_messages: int = positive(256)
    max_prompt_chars: int = positive(200000)  # message contents, summed
    max_prompt_tokens: int = non_negative(0)  # after tokenizing; 0 = the model's context
    max_stop_strings: int = positive(4)
    max_stop_chars: int = positive(256)  # per stop string
    # local endpoint: slow or idle clients (slowloris) and connection count
    header_timeout_s: float = positive(10.0)  # request line + headers must arrive within this, else the connection is closed
    body_timeout_s: float = positive(30.0)  # the body must arrive within this once the headers are in, else 408
    keep_alive_timeout_s: float = positive(5.0)  # idle keep-alive connections are closed after this
    max_connections: int = positive(256)  # beyond this many open connections or requests in flight, 503
    max_batch_size: int = positive(16)  # dynamic batching: most requests in one generate call
    batch_window_ms: float = non_negative(10.0)  # dynamic batching: how long the first request waits for company
    startup_timeout_s: float = positive(300.0)
    device: str = choice("auto", ["auto", "cpu", "cuda"])  # where the local endpoint runs the model; auto = a GPU if seen
    # the notebook's sample request parameters
    sample_parameters: Dict[str, Any] = field(
        default_factory=lambda: {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 200}
    )


@dataclass
class BackendConfig:
    name: str = choice("local", ["local", "azureml"])
    # --- azureml ---
    subscription_id: Optional[str] = None
    resource_group: Optional[str] = None
    workspace_name: Optional[str] = None
    config_path: Optional[str] = "config.json"  # MLClient.from_config path; falls back to the ids above
    registry_name: str = "azureml"
    experiment_name: str = "chat_completion_${model.name}"
    interactive: bool = True  # fall back to an interactive browser login (never under CI)
    wait: bool = True  # stream the pipeline job until it ends; false returns after submission
    force_rerun: bool = True
    continue_on_step_failure: bool = False
    component_name: str = "chat_completion_pipeline"
    component_label: str = "latest"
    component_version: Optional[str] = None
    component_spec: Optional[str] = None  # a spec YAML for dry_run validation; None = the recorded contract


@dataclass
class PathsConfig:
    root: str = "${ftrun_home:}"  # the state folder: $FTRUN_HOME, else <checkout>/.ftrun (see state_root())
    data_dir: str = "${paths.root}/data"
    models_dir: str = "${paths.root}/models"
    endpoints_dir: str = "${paths.root}/endpoints"


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///${paths.root}/mlflow.db"
    artifact_location: str = "${paths.root}/mlartifacts"
    experiment_name: str = "${backend.experiment_name}"
    registered_model_name: str = "${ftrun_model_name:${model.name},${dataset.slug}}"  # e.g. tiny-phi3-sample
    # true: the connect step repairs a broken SQLite store instead of refusing it (runner/local/store.py)
    repair_store: bool = False


@dataclass
class SweepConfig:
    """Multirun (-m) behaviour: every job trains and evaluates; only the best job is registered (and deployed)."""

    metric: str = "eval_loss"  # a finetune figure (eval_loss, perplexity, ...) or an evaluate metric (rouge_l, ...)
    direction: str = choice("minimize", ["minimize", "maximize"])
    job_steps: List[str] = list_field("connect", "model", "compute", "data", "finetune", "metrics")
    register_best: bool = True
    deploy_best: bool = False  # also deploy, test and clean up the best job's model


@dataclass
class CleanupConfig:
    delete_compute: bool = False


@dataclass
class TestStepConfig:
    rows: int = non_negative(0)  # > 0: also score the endpoint on that many of the evaluate step's rows


@dataclass
class RegisterConfig:
    """The quality gate before register (runner/steps/register.py): a model whose run diverged (final loss NaN/inf)
    or trained no optimizer step with a non-zero learning rate is refused unless one of these says otherwise."""

    allow_untrained: bool = False
    allow_nonfinite_loss: bool = False
    # an evaluate metric (e.g. rouge_l): refuse a model whose verdict on it is `worse` (runner/steps/register.py)
    require_improvement: Optional[str] = None


@dataclass
class EvaluateConfig:
    """Fine-tuned vs base on held-out chats (conf/evaluate/default.yaml documents each key)."""

    max_rows: int = positive(200)  # >= 1: rows chosen by the seed from the held-out split (all when fewer)
    max_new_tokens: int = positive(128)
    batch_size: int = positive(16)
    seed: int = bounded(42, 0, SEED_MAX)
    time_budget_s: float = non_negative(600.0)  # 0 = no budget
    file: Optional[str] = None  # a messages JSONL file to score instead of the held-out split
    metrics: List[str] = list_field(*METRIC_NAMES)
    do_sample: bool = False
    temperature: float = non_negative(1.0)
    top_p: float = bounded(1.0, 0, 1, lo_open=True)
    resamples: int = bounded(1000, 100, 1_000_000)
    device: str = choice("auto", ["auto", "cpu", "cuda"])
    # backend=azureml: the curated environment the evaluate command job runs in (runner/azureml/evaluate_job.py)
    azureml_environment: str = "azureml://registries/azureml/environments/acft-hf-nlp-gpu/versions/112"


@dataclass
class ExportConfig:
    """Take the model with you (runner/export/): merged safetensors, GGUF through llama.cpp's own converter, and an
    Ollama Modelfile beside the GGUF."""

    # any of merged, gguf_f16, gguf_q8_0, gguf_q4_k_m (q4_k_m needs the llama.cpp library: the `export` extra)
    formats: List[str] = list_field("merged", "gguf_q8_0")
    model: Optional[str] = None  # models:/NAME/VERSION or a model folder; unset: this run's (or from_run's) model
    # llama.cpp's converter: unset fetches the pinned llama-cpp-python sdist with pip into cache_dir; or a path to
    # that sdist, a folder holding it, or a llama.cpp folder with convert_hf_to_gguf.py
    converter: Optional[str] = None
    cache_dir: str = "${paths.root}/cache/llama.cpp-converter"
    output_dir: Optional[str] = None  # unset: <run dir>/export
    name: Optional[str] = None  # GGUF file and Ollama model name; unset: the registered model name
    # held-out chats llama.cpp re-checks after the export (tokenization, argmax agreement, stopping); 0: skip
    check_chats: int = bounded(5, 0, 1000)


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    compute: ComputeConfig = MISSING
    dataset: DatasetConfig = MISSING
    finetune: FinetuneConfig = MISSING
    deployment: DeploymentConfig = MISSING
    backend: BackendConfig = MISSING
    steps: List[str] = field(default_factory=lambda: list(STEPS))
    dry_run: bool = False
    seed: int = bounded(42, 0, SEED_MAX)
    from_run: Optional[str] = None  # an earlier run dir whose record later steps may pick up (e.g. steps=[deploy])
    endpoint_name: Optional[str] = None  # act on an existing endpoint (e.g. steps=[cleanup] endpoint_name=...)
    paths: PathsConfig = field(default_factory=PathsConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    cleanup: CleanupConfig = field(default_factory=CleanupConfig)
    test: TestStepConfig = field(default_factory=TestStepConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("ftrun_home"):
        OmegaConf.register_new_resolver("ftrun_home", state_root)
    if not OmegaConf.has_resolver("ftrun_pid"):  # in the default run dir: two runs started in one second differ
        OmegaConf.register_new_resolver("ftrun_pid", lambda: str(os.getpid()))

    # The root schema types every group: a group preset merged into `model`, `finetune`, ... is checked against
    # its dataclass, so presets need no schema entry of their own.
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def open_dicts(schema: type = None, prefix: str = "") -> List[str]:
    """The keys whose values are free-form dicts (Dict-typed fields): the only places a `+key=...` may add keys."""
    schema = schema or RunConfig
    found: List[str] = []
    for f in dataclasses.fields(schema):
        if isinstance(f.type, type) and dataclasses.is_dataclass(f.type):
            found += open_dicts(f.type, f"{prefix}{f.name}.")
        elif getattr(f.type, "__origin__", None) is dict:
            found.append(prefix + f.name)
    return found


def _not_a_key(prefix: str, key: str, known: List[str]) -> str:
    import difflib

    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    hint = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(sorted(known))}"
    return f"{prefix}{key} is not a config key ({hint}); only these dicts take new keys: {', '.join(open_dicts())}"


def unknown_key(path: str) -> Optional[str]:
    """Why the dotted key `path` is not a key of the schema (with the closest one), or None when it is one, or when
    it goes into a free-form dict or past a leaf (Hydra and validate() judge those). `ftrun key=value` (no +) asks
    this before Hydra composes, whose own "Could not override ... use +" would suggest adding the typo."""
    schema, prefix = RunConfig, ""
    for part in path.split("."):
        known = {f.name: f for f in dataclasses.fields(schema)}
        if part not in known:
            return _not_a_key(prefix, part, list(known))
        kind = known[part].type
        if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
            return None
        schema, prefix = kind, f"{prefix}{part}."
    return None


def _check_node(node: Any, schema: type, prefix: str, unknown: List[str], invalid: List[str]) -> None:
    """One walk of the config against the schema's dataclasses.

    Unknown keys: OmegaConf refuses `key=value` for a key the schema lacks, but Hydra's `+key=value` adds it to a
    structured node without complaint; without this check a typo such as `+finetune.learnign_rate=1e-5` would run
    the whole workflow with the setting silently ignored. Invalid values: a field's `choices` (see choice()) or
    `range` (see bounded()): every int/float key declares one, so nothing numeric reaches a step unchecked."""
    from omegaconf import DictConfig

    known = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in known:
            unknown.append(_not_a_key(prefix, key, list(known)))
    for name, f in known.items():
        if "choices" in f.metadata and node.get(name) not in f.metadata["choices"]:
            allowed = ", ".join(str(c) for c in f.metadata["choices"])
            invalid.append(f"{prefix}{name}={node.get(name)!r} is not allowed; allowed values: {allowed}")
        if "range" in f.metadata and name in node and node.get(name) not in f.metadata["range"]:
            value = node.get(name)
            finite = "a finite number " if isinstance(value, float) and not math.isfinite(value) else ""
            invalid.append(f"{prefix}{name}={value!r} is out of range: must be {finite}{f.metadata['range']}")
        if isinstance(f.type, type) and dataclasses.is_dataclass(f.type) and name in node:
            child = node._get_node(name) if hasattr(node, "_get_node") else node[name]
            if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
                _check_node(child, f.type, f"{prefix}{name}.", unknown, invalid)


# The numeric values of the free-form dicts that the schema cannot type: checked like the fields' ranges.
SAMPLE_PARAMETER_RANGES = {
    "temperature": Range(0),
    "top_p": Range(0, 1, lo_open=True),
    "top_k": Range(0),
    "max_new_tokens": Range(1),
    "repetition_penalty": Range(0, lo_open=True),
}


def _dict_value_errors(cfg: Any) -> List[str]:
    errors = []
    for split, rows in cfg.dataset.sample_rows.items():
        if isinstance(rows, bool) or not isinstance(rows, int) or rows not in Range(1):
            errors.append(f"dataset.sample_rows.{split}={rows!r} is out of range: must be an integer >= 1")
    for key, value in cfg.deployment.sample_parameters.items():
        if key in SAMPLE_PARAMETER_RANGES and value not in SAMPLE_PARAMETER_RANGES[key]:
            errors.append(f"deployment.sample_parameters.{key}={value!r} is out of range: must be a number "
                          f"{SAMPLE_PARAMETER_RANGES[key]}")
    return errors


def validate(cfg: Any) -> None:
    """Check everything the types alone cannot; raise ConfigError listing every problem."""
    unknown: List[str] = []
    errors: List[str] = []
    _check_node(cfg, RunConfig, "", unknown, errors)
    if unknown:  # the other checks read keys by name: report unknown ones alone first
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(unknown))
    unknown = [s for s in cfg.steps if s not in STEPS]
    if unknown:
        errors.append(f"steps={list(cfg.steps)} has unknown step(s) {unknown}; steps are, in order: {', '.join(STEPS)}")
    if cfg.compute.min_instances > cfg.compute.max_instances:
        errors.append(f"compute.min_instances={cfg.compute.min_instances} must be <= compute.max_instances="
                      f"{cfg.compute.max_instances}")
    tiny = cfg.model.tiny
    if tiny.hidden_size % tiny.num_attention_heads:
        errors.append(f"model.tiny.hidden_size={tiny.hidden_size} must be a multiple of model.tiny.num_attention_heads="
                      f"{tiny.num_attention_heads}")
    if cfg.dataset.source == "local" and not cfg.dataset.train_file:
        errors.append("dataset=local needs dataset.train_file=PATH (a JSONL, JSON or Parquet file of chats; "
                      "dataset.eval_file=PATH optional)")
    if sum(cfg.deployment.traffic.values()) != 100 or any(v < 0 for v in cfg.deployment.traffic.values()):
        errors.append(f"deployment.traffic={dict(cfg.deployment.traffic)} must be non-negative percentages adding up to 100")
    if cfg.deployment.deployment_name not in cfg.deployment.traffic:
        errors.append(
            f"deployment.deployment_name={cfg.deployment.deployment_name!r} has no entry in deployment.traffic "
            f"{dict(cfg.deployment.traffic)}"
        )
    errors += _dict_value_errors(cfg)
    errors += evaluate_config_errors(cfg)  # metric names (runner/evaluation/names.py)
    from runner.export.formats import format_errors  # light: names only

    errors += format_errors(cfg.export.formats)
    errors += kind_errors(cfg)  # compute/deployment presets of the backend's kind (reads conf/)
    errors += route_errors(cfg)  # the Azure route's combinations
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
