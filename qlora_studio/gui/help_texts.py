"""One-sentence explanations of each setting, shown as tooltips next to the widget that edits it.

Keyed by the configuration key (``section.key``) so every page explains a setting the same way.
"""

from __future__ import annotations

TIPS: dict[str, str] = {
    # model
    "model.name_or_path": (
        "A Hugging Face hub id such as meta-llama/Llama-3.2-1B, or a local folder holding config.json, "
        "the tokenizer and the weights."
    ),
    "model.revision": "The branch, tag or commit of a hub model to use; 'main' is the latest.",
    "model.trust_remote_code": (
        "Runs Python code shipped with the model to build it: only tick this for models whose authors you"
        " trust."
    ),
    "model.attn_implementation": (
        "The attention kernel: sdpa is PyTorch's fused attention and a safe default; flash_attention_2 "
        "needs the flash-attn package and a recent GPU."
    ),
    # quant
    "quant.quant_type": (
        "NF4 (4-bit NormalFloat) spaces its 16 levels for normally distributed weights and loses less "
        "than FP4, the plain 4-bit float."
    ),
    "quant.double_quant": (
        "Double quantization also quantizes the per-block scaling constants, saving about 0.37 bits per "
        "parameter (about 3 GB on a 65B model) at no measurable cost."
    ),
    "quant.compute_dtype": (
        "The precision the 4-bit weights are unpacked to for each matrix multiply; auto picks bfloat16 "
        "where the GPU supports it, else float16."
    ),
    # lora
    "lora.r": (
        "The rank r of each adapter: the adapter adds two thin matrices of width r, so a larger r learns "
        "more and takes more memory."
    ),
    "lora.alpha": (
        "The adapter's output is scaled by alpha / r, so alpha sets how strongly the adapter changes the "
        "frozen model."
    ),
    "lora.dropout": (
        "The fraction of the adapter's inputs dropped at random during training, which reduces "
        "overfitting on small datasets."
    ),
    "lora.target_modules": (
        "The linear layers that get an adapter; the QLoRA paper puts one on every linear layer, which "
        "matches full fine-tuning best."
    ),
    # data
    "data.path": "A local .jsonl, .json, .csv, .parquet or .txt file, or a Hugging Face hub dataset id.",
    "data.format": "How records are turned into prompt and response: auto detects it from the column names.",
    "data.split": "The split of a hub dataset to train on, e.g. train.",
    "data.max_seq_len": "Examples longer than this many tokens are truncated; memory grows with it.",
    "data.train_on_prompt": (
        "Also learn the prompt tokens; by default only the responses are learned and the prompt is "
        "masked."
    ),
    "data.val_fraction": "The fraction of examples held out to measure evaluation loss; 0 for none.",
    "data.val_path": "A separate validation file; when set, it is used instead of a held-out fraction.",
    "data.shuffle_seed": (
        "The seed of the shuffle that picks the validation examples, so splits are repeatable."
    ),
    # train
    "train.micro_batch_size": (
        "Examples per forward and backward pass; lower it when the GPU runs out of memory."
    ),
    "train.grad_accum_steps": (
        "Micro-batches whose gradients are summed before each optimizer step, so the effective batch is "
        "micro batch × accumulation."
    ),
    "train.max_steps": "Optimizer steps to train; 0 trains for the number of epochs instead.",
    "train.epochs": "Passes over the dataset, used when max steps is 0.",
    "train.learning_rate": (
        "The step size of the optimizer; QLoRA uses 2e-4 for models up to 13B and 1e-4 above."
    ),
    "train.schedule": (
        "How the learning rate changes over the run: constant (as in QLoRA), linear or cosine decay."
    ),
    "train.warmup_steps": (
        "Steps over which the learning rate ramps up from zero, which steadies the first updates."
    ),
    "train.optimizer": (
        "Paged AdamW keeps the optimizer state in paged memory that moves to the CPU when the GPU is "
        "full, so memory spikes page out instead of crashing."
    ),
    "train.weight_decay": "Pulls the adapter weights towards zero a little each step; 0 in the QLoRA paper.",
    "train.max_grad_norm": "Gradients are clipped to this norm to keep updates stable; QLoRA uses 0.3.",
    "train.gradient_checkpointing": (
        "Recomputes activations in the backward pass instead of storing them: much less memory, "
        "usually for some time (on an 8B model about 25% more). On a GPU the engine replays the "
        "recomputed layers as CUDA graphs, so a small model can even train faster with it (a 1B "
        "model more than twice as fast on an H200)."
    ),
    "train.offload_checkpoints": (
        "On a GPU, the layer inputs that checkpointing keeps wait in CPU memory and come back for the "
        "backward pass: less GPU memory (1 GiB on an 8B model), the same results. Where a micro-batch's "
        "MLP would take a large share of the memory, it also runs on 2,048 tokens at a time."
    ),
    "train.embeddings_on_cpu": (
        "On a GPU, an input embedding that is not shared with the output head stays in CPU memory; only "
        "the rows a step uses are copied over. The same results."
    ),
    "train.fused_kernels": (
        "On a recent NVIDIA GPU with liger-kernel installed (pip install 'qlora-studio[fast]'), RMSNorm, "
        "SwiGLU and RoPE each run as one kernel: faster and smaller steps, results equal up to rounding."
    ),
    "train.fused_optimizer": (
        "The paged 32-bit AdamW updates every adapter weight in one fused kernel call a step, its state "
        "in one paged buffer, instead of one call per weight: faster, the same arithmetic."
    ),
    "train.cuda_graphs": (
        "On a GPU, with checkpoints in CPU memory, each layer's passes are recorded once per batch shape "
        "and then replayed as CUDA graphs: the same kernels without Python's cost of launching them, "
        "often twice as fast for small models. Costs some memory (shown in the estimate): turn it off "
        "when a run barely fits."
    ),
    "train.paging_counters": (
        "Count the paged optimizer's moves between GPU and CPU memory for the GPU Monitor page (needs "
        "cupti-python); reading them costs about 20 ms every 5 seconds."
    ),
    "train.seed": (
        "The random seed for adapter initialisation, dropout and data order, so runs are repeatable."
    ),
    "train.eval_every": "Measure evaluation loss every this many steps; 0 for never.",
    "train.checkpoint_every": (
        "Save a resumable checkpoint every this many steps; 0 saves only at the end or on stop."
    ),
    "train.keep_checkpoints": "How many of the newest checkpoints to keep on disk.",
    "train.log_every": "Report a step event every this many steps; 0 reports every step of the first thousand, then fewer and fewer so a long run's log stays small.",
    "train.device": (
        "Where to train: auto uses the NVIDIA GPU if there is one, else the CPU (slow, but fine for the "
        "demo)."
    ),
    "output.run_name": "The run's folder name in the runs folder; empty uses the date and time.",
    # app
    "app.stop_grace_s": (
        "After Stop, how long to wait for the worker to write its checkpoint before killing it."
    ),
    "app.preset": (
        "Fills in tested settings: Quick demo trains the demo in seconds, QLoRA paper is the paper's "
        "recipe, Low VRAM fits large models on small GPUs."
    ),
}


def tip(key: str) -> str:
    return TIPS[key]
