"""The out-of-domain check: is an image from the drawn world the default bundle's models were trained on?

The bundle's models know one procedurally drawn world (flat-coloured people, trees, dogs, cars, ... on a park,
grass or street), nothing else: shown a photograph they answer with world text that has nothing to do with it.
This check gives them a way to say so. An image is embedded with the bundle's world encoder (a CLIP-style
`OwlViTModel`, bundle/encoder): the mean of its vision tower's patch tokens (`patch_mean`; or the projected
class embedding, `projection`). World scenes' embeddings are summarised by a probabilistic PCA (Tipping & Bishop):
their mean, the top K principal directions with their variances and one variance for the rest. The distance of an
image is its Mahalanobis distance under that Gaussian; above a threshold set at a high percentile of world scenes
the model was not fitted on, the image is far. The encoder alone also finds far world scenes laid out unlike the
training sampler's, so a second, cheap test must agree: the world is painted in flat colours from a small palette
(the colours of world scenes, 5 bits per channel, widened by one step for resampling and compression), and the
share of an image's pixels in that palette (`coverage`) is near 1 for any drawn scene, far lower for a photograph
(its colours are everywhere). An image is out of domain when it is far AND its coverage is below a threshold.
Statistics, palette and thresholds come from world scenes alone (bench/domain_check.py fits and measures them);
photographs are only ever used to measure the detection rate.

Stored as one small safetensors file (mean, components, variances, the palette's bits) whose metadata hold the
thresholds, the
feature and the encoder folder (relative to the file). This module knows embeddings and statistics; nothing of
the world's drawing (it takes images), of the agent or of what to tell the user.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from toolvlm.tools.base import MissingWeightsError

log = logging.getLogger(__name__)

FEATURES = ("patch_mean", "projection")
BATCH = 16
BINS = 32  # palette levels per channel (5 bits)
PALETTE_SIDE = (
    256  # images are shrunk (nearest neighbour: no new colours) to at most this side for the palette
)


def colour_codes(image: Image.Image) -> np.ndarray:
    """The palette bin of every pixel (of the image shrunk to PALETTE_SIDE), as a flat int array."""
    image = image.convert("RGB")
    scale = PALETTE_SIDE / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.NEAREST)
    q = np.asarray(image, dtype=np.int32) // (256 // BINS)
    return (q[..., 0] * BINS * BINS + q[..., 1] * BINS + q[..., 2]).ravel()


def fit_palette(images: Sequence[Image.Image], min_share: float = 1e-4, widen: int = 1) -> np.ndarray:
    """The world's palette: bins holding at least `min_share` of the scenes' pixels (on average), widened by
    `widen` steps of one bin along one channel. A flat bool array of BINS**3."""
    share = np.zeros(BINS**3)
    for image in images:
        codes = colour_codes(image)
        share += np.bincount(codes, minlength=BINS**3) / codes.size
    cube = (share / max(1, len(images)) >= min_share).reshape(BINS, BINS, BINS)
    for _ in range(widen):  # one step along one channel at a time (a cross, as binary dilation's default)
        grown = cube.copy()
        for axis in range(3):
            moved, target = np.moveaxis(cube, axis, 0), np.moveaxis(grown, axis, 0)
            target[1:] |= moved[:-1]
            target[:-1] |= moved[1:]
        cube = grown
    return cube.ravel()


def palette_coverage(image: Image.Image, palette: np.ndarray) -> float:
    """The share of the image's pixels whose colour is in the palette."""
    return float(palette[colour_codes(image)].mean())


@dataclass
class DomainStats:
    """A Gaussian over world embeddings (probabilistic PCA) and the distance above which an image is foreign."""

    feature: str
    mean: np.ndarray  # (D,)
    components: np.ndarray  # (K, D), orthonormal rows
    variances: np.ndarray  # (K,) variance along each component
    residual: float  # variance of every other direction
    threshold: float = float("inf")
    percentile: float = 100.0  # of the calibration scenes' distances the threshold was set at
    encoder: str = "encoder"  # the encoder folder, relative to the stats file (or absolute)
    palette: np.ndarray | None = None  # (BINS**3,) bool: the world's colours; None: no palette test
    coverage_threshold: float = 1.0  # out of domain needs a coverage below this

    def __post_init__(self) -> None:
        if self.feature not in FEATURES:
            raise ValueError(f"feature must be one of {', '.join(FEATURES)}, not {self.feature!r}")
        k, d = self.components.shape
        if self.mean.shape != (d,) or self.variances.shape != (k,):
            raise ValueError(
                f"domain statistics do not fit together: mean {self.mean.shape}, components {(k, d)}, "
                f"variances {self.variances.shape}"
            )

    def distance(self, features: np.ndarray) -> np.ndarray:
        """The Mahalanobis distance of each row of `features` (N, D) under the fitted Gaussian."""
        centred = np.asarray(features, dtype=np.float64) - self.mean
        along = centred @ self.components.T  # (N, K)
        rest = np.maximum((centred**2).sum(1) - (along**2).sum(1), 0.0)
        return np.sqrt((along**2 / self.variances).sum(1) + rest / self.residual)

    def save(self, path: str | Path) -> None:
        """Write the statistics as safetensors (float32), the rest as its metadata."""
        from safetensors.numpy import save_file

        tensors = {
            "mean": self.mean.astype(np.float32),
            "components": self.components.astype(np.float32),
            "variances": self.variances.astype(np.float32),
        }
        if self.palette is not None:
            tensors["palette"] = np.packbits(self.palette.astype(bool))
        meta = {"feature": self.feature, "residual": self.residual, "threshold": self.threshold}
        meta |= {
            "percentile": self.percentile,
            "encoder": self.encoder,
            "coverage_threshold": self.coverage_threshold,
        }
        save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})

    @classmethod
    def load(cls, path: str | Path) -> DomainStats:
        """Read a file written by `save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MissingWeightsError(f"domain statistics not found: {path}")
        with safe_open(str(path), framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        missing = sorted({"mean", "components", "variances"} - set(tensors)) + sorted(
            {"feature", "residual", "threshold"} - set(meta)
        )
        if missing:
            raise ValueError(f"{path} is not a domain statistics file (missing {missing})")
        palette = np.unpackbits(tensors["palette"]).astype(bool) if "palette" in tensors else None
        return cls(
            meta["feature"],
            tensors["mean"].astype(np.float64),
            tensors["components"].astype(np.float64),
            tensors["variances"].astype(np.float64),
            float(meta["residual"]),
            float(meta["threshold"]),
            float(meta.get("percentile", 100.0)),
            str(meta.get("encoder", "encoder")),
            palette,
            float(meta.get("coverage_threshold", 1.0)),
        )


def fit_stats(
    features: np.ndarray, feature: str, components: int = 24, encoder: str = "encoder"
) -> DomainStats:
    """Probabilistic PCA of world embeddings (N, D): the top `components` directions, the rest as one variance."""
    features = np.asarray(features, dtype=np.float64)
    n, d = features.shape
    if n <= components:
        raise ValueError(f"need more scenes than components to fit: {n} scenes, {components} components")
    mean = features.mean(0)
    _, singular, vt = np.linalg.svd(features - mean, full_matrices=False)
    variances = singular**2 / (n - 1)
    residual = float(variances[components:].sum() / max(1, d - components))
    return DomainStats(
        feature, mean, vt[:components], variances[:components], max(residual, 1e-12), encoder=encoder
    )


def set_threshold(stats: DomainStats, distances: np.ndarray, percentile: float, margin: float = 1.0) -> None:
    """Set the threshold at `percentile` of world scenes' distances (scenes the stats were not fitted on), times
    `margin`."""
    stats.threshold = float(np.percentile(distances, percentile) * margin)
    stats.percentile = percentile


@dataclass
class DomainVerdict:
    """Whether an image is from the world: its distance and palette coverage, and the thresholds they were held
    to (out of domain: distance above its threshold and coverage below its own)."""

    in_domain: bool
    distance: float
    threshold: float
    coverage: float = 0.0
    coverage_threshold: float = 1.0


class DomainCheck:
    """The world encoder (loaded on first use) with the statistics of world scenes."""

    def __init__(self, stats: DomainStats, encoder: str | Path, device: str = "cpu") -> None:
        self.stats = stats
        self.encoder_folder = Path(encoder)
        self.device = device
        self._model: Any = None
        self._processing: dict[str, Any] = {}

    @classmethod
    def from_file(cls, path: str | Path, device: str = "cpu") -> DomainCheck:
        """The check of a statistics file; its encoder folder is taken relative to the file."""
        path = Path(path)
        stats = DomainStats.load(path)
        encoder = Path(stats.encoder)
        return cls(stats, encoder if encoder.is_absolute() else path.parent / encoder, device)

    def load(self) -> None:
        """Load the encoder (once)."""
        if self._model is not None:
            return
        from transformers import OwlViTModel

        folder = self.encoder_folder
        if not (folder / "config.json").is_file():
            raise MissingWeightsError(f"the domain check's encoder is missing: no config.json in {folder}")
        self._model = OwlViTModel.from_pretrained(folder).float().to(self.device).eval()
        processor = folder / "processor_config.json"
        settings = json.loads(processor.read_text()).get("image_processor", {}) if processor.is_file() else {}
        self._processing = {
            "size": int(self._model.config.vision_config.image_size),
            "mean": np.array(settings.get("image_mean", (0.48145466, 0.4578275, 0.40821073)), np.float32),
            "std": np.array(settings.get("image_std", (0.26862954, 0.26130258, 0.27577711)), np.float32),
        }

    def _pixels(self, image: Image.Image) -> Any:
        import torch

        size, mean, std = self._processing["size"], self._processing["mean"], self._processing["std"]
        resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        array = (np.asarray(resized, dtype=np.float32) / 255.0 - mean) / std
        return torch.from_numpy(array).permute(2, 0, 1)

    def features(self, images: Sequence[Image.Image], feature: str | None = None) -> np.ndarray:
        """The (N, D) embeddings of images (the stats' feature unless another is named)."""
        import torch

        self.load()
        feature = feature or self.stats.feature
        if feature not in FEATURES:
            raise ValueError(f"feature must be one of {', '.join(FEATURES)}, not {feature!r}")
        rows = []
        for start in range(0, len(images), BATCH):
            pixels = torch.stack([self._pixels(im) for im in images[start : start + BATCH]]).to(self.device)
            with torch.inference_mode():
                out = self._model.vision_model(pixel_values=pixels)
                if feature == "patch_mean":
                    rows.append(out.last_hidden_state[:, 1:].mean(1).float().cpu().numpy())
                else:
                    rows.append(self._model.visual_projection(out.pooler_output).float().cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, self.stats.mean.shape[0]))

    def distances(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Each image's distance from the world scenes."""
        return self.stats.distance(self.features(images))

    def verdicts(self, images: Sequence[Image.Image]) -> list[DomainVerdict]:
        """Whether each image is from the world."""
        stats = self.stats
        out = []
        for image, distance in zip(images, self.distances(images), strict=True):
            coverage = palette_coverage(image, stats.palette) if stats.palette is not None else 0.0
            foreign = distance > stats.threshold and coverage < stats.coverage_threshold
            out.append(
                DomainVerdict(
                    not foreign, float(distance), stats.threshold, coverage, stats.coverage_threshold
                )
            )
            log.debug("domain check: distance %.2f (threshold %.2f), coverage %.3f (threshold %.3f)",
                     distance, stats.threshold, coverage, stats.coverage_threshold)  # fmt: skip
        return out

    def check(self, image: Image.Image) -> DomainVerdict:
        """Whether one image is from the world."""
        return self.verdicts([image])[0]
