"""Temperature scaling and the "unknown" threshold of an export: fitting, and calibration.json I/O.

    EXPORT/calibration.json   {"temperature": T, "threshold": t, "keep_known_share": 0.95, "split": "val",
                               "samples": n, "nll_before": ..., "nll_after": ..., "ece_before": ..., "ece_after": ...}

Temperature scaling (Guo et al., 2017) divides the logits by one positive number T fitted to
minimise the negative log-likelihood on the validation split. It never changes the top-1
brand, only how sure the model says it is. The NLL of softmax(beta * z) is convex in
beta = 1/T, so the fit is a bisection on its derivative in float64: exact to 1e-12,
deterministic, the same number on every machine given the same logits.

The threshold rule: the largest t that still keeps KEEP_KNOWN_SHARE (95 %) of the known-brand
validation photos (calibrated top-1 probability >= t). No unknown-brand photos exist at
training time, so a threshold cannot be tuned on them; what can be fixed in advance is the
price paid on the brands the model knows: about 5 % of them answered "unknown". Everything
less confident than the bottom 5 % of real, known-brand photos is then called unknown.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from carbrand import metrics as M
from carbrand.errors import CarbrandError, UsageError
from carbrand.filesystem import write_text_atomically

CALIBRATION_FILE = "calibration.json"
KEEP_KNOWN_SHARE = 0.95
ECE_BINS = 15
BETA_RANGE = (1e-3, 1e3)  # 1/T: from T = 1000 (near uniform) to T = 0.001 (near one-hot)


@dataclass(frozen=True)
class Calibration:
    temperature: float
    threshold: float  # calibrated top-1 probability below which the answer is "unknown" (--min-confidence auto)
    fitted: bool = True  # False: the split had no NLL minimum (no mistakes, every margin wide), temperature kept at 1
    keep_known_share: float = KEEP_KNOWN_SHARE
    split: str = "val"
    samples: int = 0
    nll_before: float = math.nan
    nll_after: float = math.nan
    ece_before: float = math.nan
    ece_after: float = math.nan


def calibrated_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float64 softmax(logits / temperature) over dim 1: what predict, evaluate (and exports) answer with."""
    return (logits.double() / temperature).softmax(dim=1)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """T minimising the mean NLL of softmax(logits / T) over (logits [n, c], labels [n]); None when there is no
    minimum (every image classified right with a margin, as a small val split often is)."""
    z = logits.detach().double().cpu()
    y = labels.detach().long().cpu()
    if len(z) == 0:
        raise CarbrandError("cannot fit a temperature on zero images")
    true_logit = z.gather(1, y.view(-1, 1)).squeeze(1)

    def slope(beta: float) -> float:  # d NLL / d beta = mean(E_p[z] - z_y), increasing in beta
        p = (beta * z).softmax(dim=1)
        return float(((p * z).sum(dim=1) - true_logit).mean())

    low, high = BETA_RANGE
    if slope(low) >= 0:
        return 1 / low
    if slope(high) <= 0:
        # Every image right with a margin: the NLL keeps falling as T -> 0, so there is no minimum to fit,
        # and a T at the bound would make every answer 100 % sure (and any later mistake infinitely costly).
        return None
    for _ in range(200):  # bisection in log space: scale-free over six orders of magnitude
        middle = math.sqrt(low * high)
        if slope(middle) > 0:
            high = middle
        else:
            low = middle
        if high / low < 1 + 1e-12:
            break
    return 1 / math.sqrt(low * high)


def known_share_threshold(confidences: torch.Tensor, keep_share: float = KEEP_KNOWN_SHARE) -> float:
    """The largest t with at least `keep_share` of `confidences` >= t."""
    if not 0 < keep_share <= 1:
        raise UsageError(f"the share of known photos to keep must be in (0, 1]; got {keep_share}")
    ordered = confidences.double().sort().values
    if len(ordered) == 0:
        return 0.0
    rejected = int(math.floor((1 - keep_share) * len(ordered) + 1e-9))  # at most this many fall below t
    return float(ordered[rejected])


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.double() / temperature, labels.long()))


def ece(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    confidence, predicted = probabilities.max(dim=1)
    return M.expected_calibration_error(confidence, predicted == labels, ECE_BINS)


def fit_calibration(logits: torch.Tensor, labels: torch.Tensor, keep_share: float = KEEP_KNOWN_SHARE,
                    split: str = "val") -> Calibration:
    """Temperature, threshold and the before/after figures on (logits, labels) of known-brand photos."""
    logits, labels = logits.double().cpu(), labels.long().cpu()
    fitted = fit_temperature(logits, labels)
    temperature = 1.0 if fitted is None else fitted  # nothing to correct that this split can show: leave the logits as they are
    after = calibrated_probabilities(logits, temperature)
    return Calibration(
        temperature=temperature,
        fitted=fitted is not None,
        threshold=known_share_threshold(after.max(dim=1).values, keep_share),
        keep_known_share=keep_share,
        split=split,
        samples=len(labels),
        nll_before=nll(logits, labels),
        nll_after=nll(logits, labels, temperature),
        ece_before=ece(logits.softmax(dim=1), labels),
        ece_after=ece(after, labels),
    )


def save_calibration(directory: Path, calibration: Calibration) -> Path:
    path = Path(directory) / CALIBRATION_FILE
    write_text_atomically(path, json.dumps(asdict(calibration), indent=2) + "\n")
    return path


def load_calibration(directory: str | Path) -> Calibration | None:
    """The export's calibration.json, or None when it has none; a one-line error when it is damaged."""
    path = Path(directory) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(Calibration)}
        values = {k: v for k, v in raw.items() if k in known}
        values = {k: (v if k in ("split", "fitted") else int(v) if k == "samples" else float(v)) for k, v in values.items()}
        if not isinstance(values.get("fitted", True), bool):
            raise ValueError(f"fitted must be true or false; got {values['fitted']!r}")
        calibration = Calibration(**values)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as error:
        raise CarbrandError(f"{path} is not a valid calibration file ({type(error).__name__}: {error})") from None
    if not (math.isfinite(calibration.temperature) and calibration.temperature > 0):
        raise CarbrandError(f"{path}: temperature must be a positive number; got {calibration.temperature}")
    if not 0 <= calibration.threshold <= 1:
        raise CarbrandError(f"{path}: threshold must be in [0, 1]; got {calibration.threshold}")
    return calibration


def resolve_min_confidence(value: str | float | None, calibration: Calibration | None, checkpoint: Path | str) -> float | None:
    """--min-confidence: None (never unknown), "auto" (the stored threshold) or a probability in [0, 1]."""
    if value is None:
        return None
    if isinstance(value, str):
        if value == "auto":
            if calibration is None:
                raise UsageError(f"--min-confidence auto: {checkpoint} has no {CALIBRATION_FILE}; "
                                 f"run `carbrand calibrate --checkpoint {checkpoint} --data PREPARED` or give a number")
            return calibration.threshold
        try:
            value = float(value)
        except ValueError:
            raise UsageError(f"--min-confidence must be 'auto' or a probability in [0, 1]; got {value!r}") from None
    if not 0 <= value <= 1:
        raise UsageError(f"--min-confidence must be 'auto' or a probability in [0, 1]; got {value}")
    return float(value)
