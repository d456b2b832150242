"""rFID: the Frechet distance between Inception-v3 features of real images and of their
reconstructions, accumulated in one streaming pass.

    python -m train eval RUN_DIR --data /images/val --inception weights-inception-2015-12-05-6726825d.pth
    python -m train eval RUN_DIR --data /images/val --save-ref-stats val256.npz   # keep the real side
    python -m train eval RUN_DIR --data /images/val --ref-stats val256.npz        # reuse it

The distance is Heusel et al. 2017 ("GANs trained by a two time-scale update rule converge
to a local Nash equilibrium", TTUR), between Gaussians fitted to 2048-d pool features:

    d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))

with the trace of the matrix square root taken, as torch-fidelity 0.4 does it
(``metric_fid.fid_statistics_to_metric``), as the sum of the square roots of the
eigenvalues of ``S_1 S_2`` (pytorch-fid takes ``scipy.linalg.sqrtm`` instead; the two agree
up to rounding).  ``S`` is the unbiased covariance (``numpy.cov``), as both tools compute it.

The features come from torch-fidelity's ``FeatureExtractorInceptionV3`` (the port of the
TensorFlow 2015-12-05 Inception graph that taming-transformers used for its published
numbers): uint8 images, resized to 299x299 inside the extractor with its TF1-compatible
bilinear interpolation, pool3 features ("2048").  Its weights are read from a local file by
this tool's weights-only loader; nothing is ever downloaded (torch-fidelity's own loader
would download, or ``torch.load(weights_only=False)`` the file, which can run code).

Memory does not grow with the number of images: each side keeps float64 running sums
``sum x`` and ``sum x x^T`` (2048 + 2048^2 numbers), which torchrun ranks add up with one
all-reduce before the statistics are formed.
"""
from __future__ import annotations

import io
import os
import sys
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from train import atomic
from train.errors import UserError
from train.safe_load import UnreadableFile, load_weights_file

# torch-fidelity's file name for the weights (its URL_INCEPTION_V3); torch hub names files
# <name>-<first 8 hex digits of the SHA-256>.<ext>, and this is the full digest of that file.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
FEATURES = "2048"            # pool3, the layer FID uses
FEATURE_DIM = 2048
INCEPTION_SIZE = 299         # the extractor resizes every image to this, bilinear (TF1-compatible)
INCEPTION_BATCH = 64         # images per extractor forward (torch-fidelity's default batch_size)


def hub_inception_path() -> str:
    """Where torch-fidelity's download would have put the weights in the torch hub cache."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)


def how_to_get_inception() -> str:
    return (f"download {INCEPTION_URL} on a machine with internet and pass --inception PATH, or copy "
            f"{INCEPTION_FILE} into {os.path.dirname(hub_inception_path())}")


def find_inception(path_arg: Optional[str], required: bool) -> Optional[str]:
    """The Inception weights file to use: ``--inception PATH`` (it must exist), else the torch
    hub cache file if present, else None (or a UserError when ``required``)."""
    if path_arg is not None:
        path = os.path.expanduser(path_arg)
        if not os.path.isfile(path):
            raise UserError(f"eval: --inception {path_arg}: no such file; it should be torch-fidelity's "
                            f"{INCEPTION_FILE}: {how_to_get_inception()}")
        return path
    cached = hub_inception_path()
    if os.path.isfile(cached):
        return cached
    if required:
        raise UserError(f"eval: rFID needs the Inception weights {INCEPTION_FILE} and {cached} does not exist; "
                        + how_to_get_inception())
    return None


def _extractor_class():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


def load_inception(path: str, device: torch.device) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """``(torch-fidelity's InceptionV3 extractor with the weights of path, info)``.

    ``info`` names the file, its SHA-256 and whether it is the standard file; another file is
    used with a warning on stderr (numbers from it do not compare with published ones).
    Anything that is not an InceptionV3 state dict of torch-fidelity's layout is a UserError.
    """
    fix = (f"pass torch-fidelity's {INCEPTION_FILE} (a state dict of FeatureExtractorInceptionV3); "
           + how_to_get_inception())
    try:
        state = load_weights_file(path)
    except UnreadableFile as exc:
        what = ("it holds Python objects besides tensors, which are never unpickled (that could run code)"
                if exc.objects else f"not a readable torch file ({exc.reason})")
        raise UserError(f"eval: Inception weights {path}: {what}; {fix}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        held = type(state).__name__ if not isinstance(state, dict) else "dict that is not a plain state dict"
        raise UserError(f"eval: Inception weights {path} hold a {held}; {fix}")
    # The extractor's own keys and shapes, from a skeleton on the meta device (no memory, no
    # initialisation); the checked tensors are then assigned into it.
    with torch.device("meta"):
        extractor = _unloaded_extractor()
    expected = {k: tuple(v.shape) for k, v in extractor.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k}: {tuple(state[k].shape)}, expected {expected[k]}"
                   for k in expected if k in state and tuple(state[k].shape) != expected[k])
    parts = [f"{len(keys)} {what} (e.g. {keys[0]})"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)) if keys]
    if parts:
        raise UserError(f"eval: Inception weights {path} do not fit torch-fidelity's InceptionV3: keys "
                        f"{'; '.join(parts)}; {fix}")
    digest = atomic.sha256_file(path)
    standard = digest == INCEPTION_SHA256
    if not standard:
        print(f"eval: warning: {path} is not the standard {INCEPTION_FILE} (SHA-256 {digest}, expected "
              f"{INCEPTION_SHA256}); rFID from it does not compare with published numbers", file=sys.stderr)
    # The extractor reads its weights in __init__ with torch.load(weights_only=False); it never
    # sees the file: the skeleton was built with an empty state and now takes the checked
    # tensors (float32, as its constructor casts them).
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    torch.nn.Module.load_state_dict(extractor, state, strict=True, assign=True)
    del state
    extractor = for_inference(extractor.eval().requires_grad_(False)).to(device)
    info = {"file": os.path.abspath(path), "sha256": digest, "standard": standard,
            "features": f"pool3 ({FEATURE_DIM}-d), torch-fidelity {_torch_fidelity_version()} "
                        f"FeatureExtractorInceptionV3, images resized to {INCEPTION_SIZE} px inside it "
                        "(TF1-compatible bilinear)"}
    return extractor, info


def for_inference(extractor: torch.nn.Module) -> torch.nn.Module:
    """The extractor with each ``BasicConv2d``'s batch norm folded into its convolution and
    its weights in channels-last layout, in place; the forward code stays torch-fidelity's.

    Folding is the eval-mode algebra ``w' = w * g / sqrt(v + eps)``, ``b' = b - m * g /
    sqrt(v + eps)`` (Ioffe & Szegedy's normalisation is affine once the running statistics
    are frozen), done by ``torch.nn.utils.fusion.fuse_conv_bn_eval``.  On a CPU the pair
    runs the 2N Inception passes of an rFID about 1.6x faster (benchmarks/bench_eval.py:
    4.62 s vs 7.44 s); the pool features move by about 1e-6 (float rounding; the rFID
    parity tests hold it to 1e-3 of torch-fidelity's own ``calculate_metrics``).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for module in extractor.modules():
        conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
        if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(conv, bn)
            module.bn = torch.nn.Identity()
    return extractor.to(memory_format=torch.channels_last)


def _unloaded_extractor() -> torch.nn.Module:
    """torch-fidelity's InceptionV3 as its constructor initialises it, without weights loaded
    (it is handed an empty state dict and told to ignore it)."""

    class Unloaded(_extractor_class()):
        def load_state_dict(self, state_dict, strict=True, assign=False):   # keep the initialisation
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    return Unloaded("inception-v3-compat", [FEATURES], feature_extractor_weights_path=empty)


def random_inception_state(seed: int = 0) -> Dict[str, torch.Tensor]:
    """A state dict of torch-fidelity's InceptionV3 with random weights, for tests and
    benchmarks only (``eval`` never makes one): Kaiming-normal convolutions (seeded), so the
    pool features are of order 1 instead of vanishing through 94 layers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _unloaded_extractor()
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net.state_dict()


def _torch_fidelity_version() -> str:
    import torch_fidelity

    return str(torch_fidelity.__version__)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 the way they are saved as PNG: clamped, ``round((x + 1) * 127.5)``.
    uint8 input is returned as it is (the real crops)."""
    if images.dtype == torch.uint8:
        return images
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------
# Streaming statistics

class FeatureStats:
    """Running float64 sums of features (``n``, ``sum x``, ``sum x x^T``): the mean and the
    unbiased covariance of any number of feature rows in constant memory, summable over
    batches and ranks."""

    def __init__(self, dim: int = FEATURE_DIM, device: torch.device = torch.device("cpu")):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, features: torch.Tensor) -> None:
        f = features.to(self.sum.device, torch.float64)
        self.n += int(f.shape[0])
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def all_reduce_(self) -> None:
        """Sum over torchrun ranks (a collective: every rank must call it); no-op in one process."""
        from adapters.distributed import all_reduce_sum_, is_distributed

        if not is_distributed():
            return
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device)
        for t in (n, self.sum, self.outer):
            all_reduce_sum_(t)
        self.n = int(n.item())

    def mu_sigma(self) -> Tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (``numpy.cov``'s ``n - 1``); needs two rows or more."""
        if self.n < 2:
            raise ValueError(f"{self.n} image(s): a covariance needs at least 2")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Heusel et al.'s d^2 between two Gaussians (see the module docstring), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    diff = mu1 - mu2
    # tr sqrt(S1 S2): S1 S2 is similar to a positive semi-definite matrix, so its eigenvalues
    # are real and >= 0 up to rounding; tiny negative or complex ones contribute their real root.
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)
    tr_covmean = float(np.sqrt(eigenvalues).real.sum())
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


class RFID:
    """The two sides of rFID, fed batch by batch: Inception statistics of the real crops (or
    saved reference statistics ``ref = (mu, sigma)``) and of their reconstructions.

    Images wait (as uint8) until ``batch`` of them are at hand: the extractor runs at
    torch-fidelity's default batch size whatever the model's batch is (on a CPU a batch of
    8 costs about 1.5x per image what a batch of 64 does)."""

    def __init__(self, extractor: torch.nn.Module, ref: Optional[Tuple[np.ndarray, np.ndarray]] = None,
                 batch: int = INCEPTION_BATCH):
        device = next(extractor.parameters()).device
        self.extractor = extractor
        self.ref = ref
        self.batch = int(batch)
        self.real = FeatureStats(device=device) if ref is None else None
        self.fake = FeatureStats(device=device)
        self._waiting: list = []     # (side, uint8 images)

    def add(self, real: torch.Tensor, reconstruction: torch.Tensor) -> None:
        """One batch of images (B, 3, H, W): uint8, or floats in [-1, 1] (rounded as PNG would)."""
        device = self.fake.sum.device
        if self.real is not None:
            self._waiting.append((self.real, to_uint8(real).to(device)))
        self._waiting.append((self.fake, to_uint8(reconstruction).to(device)))
        if sum(images.shape[0] for _, images in self._waiting) >= self.batch:
            self._run()

    @torch.no_grad()
    def _run(self) -> None:
        """Features of every waiting image, ``batch`` at a time, into their side's sums."""
        if not self._waiting:
            return
        sides = [side for side, images in self._waiting for _ in range(images.shape[0])]
        images = torch.cat([images for _, images in self._waiting])
        self._waiting = []
        for start in range(0, images.shape[0], self.batch):
            features = self.extractor(images[start:start + self.batch])[0]
            chunk = sides[start:start + self.batch]
            for side in (self.real, self.fake):
                rows = [i for i, s in enumerate(chunk) if s is side]
                if rows:
                    side.add(features[rows])

    def finish(self) -> Tuple[float, Optional[Tuple[np.ndarray, np.ndarray]]]:
        """``(rFID, (mu, sigma) of the real side or None)`` over all ranks (a collective);
        ValueError when fewer than 2 images were seen.  Under torchrun rank 0 computes the
        distance (an eigendecomposition of a 2048x2048 matrix) and broadcasts it."""
        from adapters.distributed import is_distributed, rank

        self._run()
        self.fake.all_reduce_()
        if self.real is not None:
            self.real.all_reduce_()
            real = self.real.mu_sigma()
        else:
            real = self.ref
        fake = self.fake.mu_sigma()
        value = torch.zeros(1, dtype=torch.float64, device=self.fake.sum.device)
        if rank() == 0:
            value += frechet_distance(real[0], real[1], fake[0], fake[1])
        if is_distributed():
            import torch.distributed as dist

            dist.broadcast(value, src=0)
        return float(value.item()), (real if self.real is not None else None)


# ----------------------------------------------------------------------------------------
# Reference statistics files (pytorch-fid / ADM layout: mu, sigma)

def ref_stats_bytes(mu: np.ndarray, sigma: np.ndarray, meta: Dict[str, Any]) -> bytes:
    """An ``.npz`` with ``mu``, ``sigma`` (float64) and the settings that made them
    (``meta_*`` strings); pytorch-fid and ADM's evaluator read ``mu`` and ``sigma`` and
    ignore the rest."""
    buffer = io.BytesIO()
    extra = {f"meta_{k}": np.asarray(str(v)) for k, v in meta.items()}
    np.savez(buffer, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)
    return buffer.getvalue()


def load_ref_stats(path: str) -> Tuple[np.ndarray, np.ndarray, Dict[str, str]]:
    """``(mu, sigma, settings recorded with them)`` of an ``.npz`` written by this tool,
    pytorch-fid (``--save-stats``) or ADM; a UserError naming the problem otherwise."""
    fix = ("pass an .npz with mu (2048,) and sigma (2048, 2048), e.g. one written by "
           "`python -m train eval ... --save-ref-stats FILE`")
    if not os.path.isfile(path):
        raise UserError(f"eval: --ref-stats {path}: no such file; {fix}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # noqa: BLE001 - zip errors, pickled object arrays, truncated files
        raise UserError(f"eval: --ref-stats {path} is not a readable .npz ({type(exc).__name__}: {exc}); {fix}") \
            from None
    mu, sigma = arrays.get("mu"), arrays.get("sigma")
    if mu is None or sigma is None:
        raise UserError(f"eval: --ref-stats {path} has no mu/sigma arrays (it holds {sorted(arrays)[:6]}); {fix}")
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise UserError(f"eval: --ref-stats {path}: mu {mu.shape} and sigma {sigma.shape} are not the "
                        f"Inception pool3 shapes ({FEATURE_DIM},) and ({FEATURE_DIM}, {FEATURE_DIM}); {fix}")
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise UserError(f"eval: --ref-stats {path}: mu/sigma are {mu.dtype}/{sigma.dtype}, not floats; {fix}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"eval: --ref-stats {path} holds NaN or infinite values; recompute it with --save-ref-stats")
    meta = {k[len("meta_"):]: str(v) for k, v in arrays.items() if k.startswith("meta_") and v.ndim == 0}
    return mu.astype(np.float64), sigma.astype(np.float64), meta


__all__ = ["INCEPTION_FILE", "INCEPTION_SHA256", "FEATURE_DIM", "hub_inception_path", "find_inception",
           "load_inception", "random_inception_state", "to_uint8", "FeatureStats", "RFID", "frechet_distance", "ref_stats_bytes",
           "load_ref_stats"]
