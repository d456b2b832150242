"""The normalized experiment config: one dataclass schema for every config shape.

Legacy JSON experiment files, taming / latent-diffusion YAML files and this tool's own
YAML/JSON all load into :class:`ExperimentConfig` (see ``train/config.py``).  All
defaults live here, each with a comment on its meaning and unit.

Native config shape (YAML or JSON)::

    name: demo_emavq
    model_type: TamingVQGAN          # registry name (adapters/registry.py)
    model_variant: EMAVQ             # VQ | EMAVQ | Gumbel | NoDisc for TamingVQGAN
    model_args: {embed_dim: 64, n_embed: 128, ddconfig: {...}}   # constructor names
    lossconfig: {target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator,
                 params: {disc_start: 10000, ...}}
    train: {use_gan: false, learning_rate: 4.5e-6, batch_size: 8, max_steps: 1000}
    data: {path: builtin, image_size: 64}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union


@dataclass
class LossSection:
    # Fully qualified class path of the loss, as in taming's ``lossconfig.target``.
    # None means "the model type's default loss family".
    target: Optional[str] = None
    # Constructor keyword arguments of that class (checked against its signature).
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainSection:
    # False: no GAN term (disc_factor 0), no discriminator step, no discriminator optimizer.
    use_gan: bool = True
    # Absolute learning rate.  When None, base_learning_rate is scaled (taming's rule).
    learning_rate: Optional[float] = None
    # taming YAML ``model.base_learning_rate``: lr = base * batch * accumulate * world size.
    base_learning_rate: Optional[float] = None
    # Images per process per forward pass.
    batch_size: int = 8
    # Forward/backward passes per optimizer step.
    accumulate_grad_batches: int = 1
    # Optimizer steps to train for; None = until stopped (or max_epochs).
    max_steps: Optional[int] = None
    # Legacy alternative to max_steps, in passes over the data set.
    max_epochs: Optional[int] = None
    # Update the discriminator every N generator steps (taming: 1; some legacy EMAVQ trainers: 3).
    disc_update_every: int = 1
    # Clip the global gradient norm of each network to this value; None = no clipping.
    grad_clip: Optional[float] = None
    # fp32 | bf16 (autocast) | fp16 (autocast + one GradScaler per optimizer, GPU only).
    precision: str = "fp32"
    # Keep weights, activations and input batches channels-last (NHWC): faster convolutions
    # on tensor-core GPUs (with bf16 / fp16); checkpoints are the same either way.
    channels_last: bool = False
    # torch.compile the generator and the discriminator (nn.Module.compile: the state dicts,
    # and so the checkpoints, keep their key names).  The first steps take longer (compiling);
    # needs a C++ compiler (and Triton on GPUs).
    compile: bool = False
    # Adam(W) betas; taming uses (0.5, 0.9).
    adam_betas: List[float] = field(default_factory=lambda: [0.5, 0.9])
    # Decoupled weight decay (AdamW); 0 reproduces taming's Adam.
    weight_decay: float = 0.0
    # Random seed for weights, data order and crops.
    seed: int = 23
    # EMA codebooks only: on a fresh start (never on resume), give each code one random
    # encoder output of the run's first training crops and a count of 1, instead of
    # upstream's N(0, 1) codes with zero counts (which collapse to a few codes on real
    # images).  False keeps upstream's start.
    init_codebook_from_data: bool = False
    # Codebooks of code vectors (EMA ones and taming's VectorQuantizer2): on a fresh start,
    # k-means on encoder outputs of the run's first training crops -- the data start's draw,
    # then this many Lloyd iterations (VQGAN-LC, BEiT v2).  0 = off.
    init_codebook_kmeans_iters: int = 0
    # Restart codes whose usage (an EMA, decay 0.99, of how often per optimizer step the code
    # is picked, summed over ranks) is below this: they become encoder outputs of the step's
    # batch, their EMA statistics reset.  None = off.  Checked every dead_code_every steps.
    dead_code_threshold: Optional[float] = None
    dead_code_every: int = 100
    # Keep an EMA of the generator's weights (latent-diffusion's LitEma layout, model_ema.*);
    # eval / encode use it when present.  In (0, 1), e.g. 0.999; None = off.
    ema_decay: Optional[float] = None
    # Learning rate by step, for both optimizers: linear warmup over warmup_steps, then
    # constant or cosine down to min_lr_ratio x the learning rate at max_steps.
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    # Print / TensorBoard scalars every N steps.
    log_every: int = 10
    # Write an input/reconstruction PNG grid every N steps.
    image_every: int = 100
    # Rewrite checkpoints/last.ckpt and keep a numbered step-N.ckpt every N steps (last is also
    # written at the end of training and on SIGTERM/SIGINT).
    ckpt_every: int = 500
    # Stop after this many non-finite losses in a row (each one is skipped).
    max_bad_steps: int = 5
    # DataLoader worker processes per training process: "auto" = the CPUs this process may
    # use, shared among the node's training processes, minus one, at most 8 (0 on a one-CPU
    # share); an int >= 0 sets the count, 0 = load images in the training process.
    # Batches are the same for any count (train/data.py).
    num_workers: Union[int, str] = "auto"
    # ImageNet VGG16 trunk for LPIPS: a torchvision ``vgg16`` state-dict file.
    vgg_ckpt_path: Optional[str] = None
    # Allow a randomly initialised VGG16 trunk when no file is given (demos and tests only).
    allow_random_vgg: bool = False


@dataclass
class DataSection:
    # An image folder, a text file with one image path per line, or "builtin"
    # (crops of the photographs that scikit-image ships).
    path: Optional[str] = None
    # Optional held-out file list / folder for evaluation.
    val_path: Optional[str] = None
    # Square crop size in pixels.
    image_size: int = 256
    # Random (True) or centre (False) crops for training.
    random_crop: bool = True
    # DinoVQ: a feature cache written by ``python -m train extract-features``.
    feature_cache: Optional[str] = None
    # Largest image accepted, in pixels (width x height): checked from the file header before
    # decoding, and again for the image rescaled to image_size before cropping (a 200000 x 1
    # file would rescale to 13 billion pixels).  100 megapixels covers camera photographs up
    # to medium format; decoding one takes about 300 MB in each data worker.  Larger files
    # are skipped and counted like unreadable ones.
    max_image_pixels: int = 100_000_000


@dataclass
class TeacherSection:
    # DinoVQ's frozen DINO teacher: a timm model name.
    arch: str = "vit_base_patch16_224.dino"
    # Local checkpoint file with the teacher's weights (no hub access here).
    ckpt_path: Optional[str] = None
    # Use a randomly initialised teacher (tests and demos only; logged loudly).
    allow_random: bool = False
    # fp32 | bf16 for the teacher forward.
    dtype: str = "fp32"


@dataclass
class SourceInfo:
    # Where the config came from, and in which shape: native | legacy_json | taming_yaml.
    path: Optional[str] = None
    format: str = "native"


@dataclass
class ExperimentConfig:
    # Run name, used for the default run folder logs/<timestamp>_<name>.
    name: str = "experiment"
    # Registry name or alias of the model type (adapters/registry.py).
    model_type: str = "TamingVQGAN"
    # Variant within the model type (TamingVQGAN: VQ, EMAVQ, Gumbel, NoDisc).
    model_variant: Optional[str] = None
    # Constructor arguments of the model, with the upstream names.
    model_args: Dict[str, Any] = field(default_factory=dict)
    lossconfig: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    # Keys the source file carried that this tool does not use (kept, reported).
    extras: Dict[str, Any] = field(default_factory=dict)
    # Upstream sections kept verbatim (taming YAML ``data`` and ``lightning``).
    upstream: Dict[str, Any] = field(default_factory=dict)
    source: SourceInfo = field(default_factory=SourceInfo)


def as_dict(section) -> Dict[str, Any]:
    """A plain ``dict`` copy of a config section (dataclass field, DictConfig or dict)."""
    from omegaconf import DictConfig, OmegaConf

    if section is None:
        return {}
    if isinstance(section, DictConfig):
        return OmegaConf.to_container(section, resolve=True)
    return {k: (as_dict(v) if isinstance(v, (dict, DictConfig)) else v) for k, v in dict(section).items()}


def make_config(**kwargs) -> ExperimentConfig:
    """Build an ``ExperimentConfig`` in code (tests, benchmarks): nested sections may be dicts."""
    sections = {"lossconfig": LossSection, "train": TrainSection, "data": DataSection,
                "teacher": TeacherSection, "source": SourceInfo}
    for key, cls in sections.items():
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = cls(**kwargs[key])
    return ExperimentConfig(**kwargs)


def config_data(cfg) -> Dict[str, Any]:
    """The whole config as plain data in the schema's shape (what validation rules read).

    Accepts an ``ExperimentConfig``, its DictConfig, or plain data (returned as a copy).
    """
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return {k: (as_dict(v) if isinstance(v, dict) else v) for k, v in dict(cfg).items()}
