"""The typed results of the steps that later steps and the backends read, kept below both (a step builds its
result, a backend reads an earlier step's: neither imports the other).

In the run record a result is one flat mapping (the fields and the details side by side), the shape records have
always had, so `from_run=` works across versions and users' scripts keep reading `run_record.json` as before;
`from_outputs` reads it back typed. A later step reads an earlier one with `recorded(record)` (this run's result,
else the `from_run` record's; empty when it has not run ok) or `require(record, why)`, which raises MissingInput, the
same "run the X step first" exit 2 on every backend. What a backend reports beyond the fields rides in `details`;
the keys other code reads from there are typed properties here, so nobody spells a key twice.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional, Type, TypeVar

from runner.errors import MissingInput

T = TypeVar("T", bound="StepResult")


@dataclass
class StepResult:
    STEP: ClassVar[str] = ""  # the step whose outputs this is (the run record's key)
    details: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def field_names(cls) -> list:
        return [f.name for f in dataclasses.fields(cls) if f.name != "details"]

    @classmethod
    def from_outputs(cls: Type[T], outputs: Optional[Dict[str, Any]]) -> T:
        outputs = dict(outputs or {})
        known = {name: outputs.pop(name) for name in cls.field_names() if name in outputs}
        return cls(**known, details=outputs)

    @classmethod
    def from_record(cls: Type[T], record: Dict[str, Any], step: str) -> Optional[T]:
        """The step's result in a record (a RunRecord's data or a loaded run_record.json), None unless it ran ok."""
        entry = (record.get("steps") or {}).get(step) or {}
        return cls.from_outputs(entry.get("outputs")) if entry.get("status") == "ok" else None

    @classmethod
    def recorded(cls: Type[T], record: Any) -> T:
        """This step's result as a later step sees it (a RunRecord: this run's, else from_run's); an empty result
        (every field None) when the step has not run ok in either."""
        return cls.from_outputs(record.output(cls.STEP) or {})

    @classmethod
    def require(cls: Type[T], record: Any, why: str, needs: Optional[str] = None) -> T:
        """The recorded result (with a value for its `needs` field or property, when named), or MissingInput:
        `<why>: run the <step> step first (...) or from_run=<a run dir that did>`, the same on every backend."""
        found = cls.from_outputs(record.output(cls.STEP) or {})
        if not record.output(cls.STEP) or (needs is not None and not getattr(found, needs)):
            raise MissingInput(f"{why}: run the {cls.STEP} step first (steps=[...,{cls.STEP},...]) or "
                               f"from_run=<a run dir that did>")
        return found

    def to_outputs(self) -> Dict[str, Any]:
        out = {name: getattr(self, name) for name in self.field_names() if getattr(self, name) is not None}
        return {**self.details, **out}


@dataclass
class ConnectResult(StepResult):
    STEP: ClassVar[str] = "connect"

    @property
    def timestamp(self) -> Optional[str]:  # azureml: the notebook's timestamp (model version, endpoint name)
        return self.details.get("timestamp")


@dataclass
class ModelResult(StepResult):
    STEP: ClassVar[str] = "model"
    name: Optional[str] = None
    model_dir: Optional[str] = None  # local: the folder the trainer loads
    model_id: Optional[str] = None  # azureml: the registry asset id the pipeline gets

    @property
    def facts(self) -> Optional[Dict[str, Any]]:  # azureml: the registry's facts (allow lists, tags, ...)
        return self.details.get("facts")

    @property
    def tokenizer_dir(self) -> Optional[str]:  # local: a tokenizer the data step may count tokens with
        return self.details.get("tokenizer_dir")


@dataclass
class ComputeResult(StepResult):
    STEP: ClassVar[str] = "compute"
    gpus_per_node: Optional[int] = None

    @property
    def device(self) -> Optional[str]:  # local: cpu / cuda / mps, as the compute step resolved it
        return self.details.get("device")

    @property
    def estimate_gb(self) -> Dict[str, float]:  # local: the memory estimate's parts and total
        return self.details.get("estimate_gb") or {}

    def decided(self, key: str) -> Any:
        """What the local compute step decided for the trainer (auto_fit's per_device_train_batch_size and
        gradient_accumulation_steps, gradient_checkpointing with "auto" resolved); None when it did not say."""
        return self.details.get(key)


@dataclass
class DataResult(StepResult):
    STEP: ClassVar[str] = "data"
    download_dir: Optional[str] = None
    train_file: Optional[str] = None
    test_file: Optional[str] = None
    sample_file: Optional[str] = None
    files: Dict[str, str] = field(default_factory=dict)

    @property
    def manifest_sha256(self) -> Optional[str]:  # the data's identity (lineage tags, the training key)
        return self.details.get("manifest_sha256")


@dataclass
class FinetuneResult(StepResult):
    STEP: ClassVar[str] = "finetune"
    display_name: Optional[str] = None
    status: Optional[str] = None  # local: finished; azureml: submitted / Completed
    mlflow_run_id: Optional[str] = None  # local
    job_name: Optional[str] = None  # azureml
    train_loss: Optional[float] = None
    eval_loss: Optional[float] = None
    eval_loss_before: Optional[float] = None
    perplexity: Optional[float] = None
    tokens_per_s: Optional[float] = None

    @property
    def studio_url(self) -> Optional[str]:  # azureml: the job's page
        return self.details.get("studio_url")

    @property
    def registered_model_name(self) -> Optional[str]:  # azureml finetuning_job: the model the job registers
        return self.details.get("registered_model_name")

    @property
    def final_model_dir(self) -> Optional[str]:  # local: the trained adapter/model the register step logs
        return self.details.get("final_model_dir")

    @property
    def adapter_dir(self) -> Optional[str]:  # local: the LoRA adapter kept beside the base (merge_lora_weights=false)
        return self.details.get("adapter_dir")

    @property
    def training_key(self) -> Optional[str]:  # local: the training run's identity (its checkpoint folder)
        return self.details.get("training_key")

    @property
    def effective_params(self) -> Optional[Dict[str, Any]]:  # azureml: the parameters the job was sent
        return self.details.get("effective_params")


@dataclass
class MetricsResult(StepResult):
    STEP: ClassVar[str] = "metrics"
    final: Dict[str, float] = field(default_factory=dict)  # metric → its last value
    plot: Optional[str] = None
    json: Optional[str] = None


@dataclass
class RegisterResult(StepResult):
    STEP: ClassVar[str] = "register"
    model_uri: Optional[str] = None
    name: Optional[str] = None
    version: Optional[str] = None
    quality_gate: Optional[str] = None

    @property
    def model_id(self) -> Optional[str]:  # azureml: the registered model's asset id
        return self.details.get("model_id")


@dataclass
class DeployResult(StepResult):
    STEP: ClassVar[str] = "deploy"
    scoring_uri: Optional[str] = None

    @property
    def endpoint_name(self) -> Optional[str]:  # azureml
        return self.details.get("endpoint_name")

    @property
    def deployment_name(self) -> Optional[str]:  # azureml
        return self.details.get("deployment_name")

    @property
    def model_uri(self) -> Optional[str]:  # the model the endpoint serves
        return self.details.get("model_uri")
