"""finetune.local.compile: torch.compile applied to every decoder layer, the way torchtune compiles its models.

Why per layer and not the whole model: the layers share one piece of code, so one compiled graph serves them all
(dynamo treats each layer's parameters as inputs) and compiling costs about one layer's time, not N; everything
around them (embeddings, the head and loss, PEFT's wrapper, the Trainer, gradient checkpointing's wrapper) stays
eager, so saving, resuming, LoRA merging and finetune.local.chunked_loss behave exactly as without it. Inside a layer
the GPU gets fused kernels for the elementwise work between the matmuls (RMSNorm, rotary, SiLU x up, residual adds,
LoRA dropout), which in eager mode each read and write the whole activation.

`dynamic=True`: packed rows have a new length nearly every step; without dynamic shapes every new length would
compile again. The per-conversation packed attention reads the conversations' bounds back to the host, so the graph
breaks around it (two graphs per layer); packed_attention=varlen is one custom op and stays inside the graph (one
graph per layer, checked on the CPU with a compilable double of the kernel).

Under gradient checkpointing a layer compiles only as one whole graph (dynamo traces torch.utils.checkpoint as a
single higher-order op, which allows no graph break inside): padded batches and packed_attention=varlen qualify, the
per-conversation attention does not, and then nothing would be compiled at all, silently. Checked on the CPU:
12-layer Phi-3 shape, padded + checkpointing compiles one graph for all layers; packed per-conversation +
checkpointing compiles none. That combination is refused before the model loads (compile_refusal).

Nothing here is used by default. Whether it pays is a GPU measurement (bench/gpu_train.py, contender
runner-compile); on this project's CPU machine it is not faster (0.99x in bench/gpu_train.py --smoke).
"""

from runner.errors import RunnerError


def decoder_layers(model) -> list:
    """The model's decoder layers: transformers' GradientCheckpointingLayer subclasses (every decoder layer of a
    current transformers model), found through any wrapper (PEFT)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_decoder_layers(model) -> int:
    """Compile every decoder layer in place (module.compile: state_dict keys and parameters stay as they are);
    returns how many. Compilation itself happens lazily, in the first forward of each new kind of call."""
    layers = decoder_layers(model)
    if not layers:
        raise RunnerError(f"finetune.local.compile=true: {type(model).__name__} has no decoder layers that "
                          f"transformers marks as such (GradientCheckpointingLayer); set compile=false")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def compile_refusal(local, *, packing: bool, checkpointing: bool):
    """Why finetune.local.compile=true would compile nothing with these settings (None: it compiles)."""
    if not local.get("compile") or not checkpointing or not packing:
        return None
    if local.get("packed_attention", "per_conversation") == "varlen":
        return None
    return ("finetune.local.compile=true with gradient checkpointing and packed_attention=per_conversation would "
            "compile nothing: a checkpointed layer compiles only as one graph, and the per-conversation attention "
            "reads the conversation bounds back to the host. Use packed_attention=varlen (CUDA), or "
            "gradient_checkpointing=false, or compile=false")

