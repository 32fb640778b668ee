"""`semiseg weights check`: which published backbone files are present, their size and SHA-256, and
whether each loads into its backbone.

A `SHA256SUMS` file in the folder (`sha256sum` format) pins the sums a lab downloaded once; files that
differ from it are reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXPECTED = {"resnet50.pth": "resnet50", "resnet101.pth": "resnet101", "xception.pth": "xception65"}
"""File name -> the backbone (model.backbone) it loads into, as UniMatch and MSP_CCL publish them."""
SUMS_FILE = "SHA256SUMS"


@dataclass(frozen=True)
class WeightsStatus:
    name: str
    backbone: str
    path: Path
    present: bool
    size: int | None = None
    sha256: str | None = None
    loaded: int | None = None
    """Tensors copied into the backbone; None when it did not load."""
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Absent, or present and loading (an absent file is only an error for a config that names it)."""
        return self.error is None


def pinned_sums(folder: Path) -> dict[str, str]:
    """File name -> SHA-256 from `folder/SHA256SUMS` (empty when there is none)."""
    path = folder / SUMS_FILE
    if not path.is_file():
        return {}
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*")] = digest.lower()
    return sums


def check_file(folder: Path, name: str, backbone: str, pinned: str | None = None) -> WeightsStatus:
    """Size, SHA-256 and a real load of `folder/name` into a fresh `backbone`."""
    from pretrained import WeightsError, load_backbone_weights
    from trainers.backbones import BACKBONES
    from trainers.checkpoint import sha256

    path = folder / name
    if not path.is_file():
        return WeightsStatus(name, backbone, path, present=False)
    digest = sha256(path)
    size = path.stat().st_size
    if pinned is not None and digest != pinned:
        error = f"SHA-256 {digest} differs from {pinned} pinned in {folder / SUMS_FILE}: re-download it"
        return WeightsStatus(name, backbone, path, True, size, digest, error=error)
    try:
        report = load_backbone_weights(BACKBONES[backbone](), path)
    except WeightsError as exc:
        return WeightsStatus(name, backbone, path, True, size, digest, error=str(exc))
    return WeightsStatus(name, backbone, path, True, size, digest, loaded=report.loaded)


def check_weights(folder: str | Path = "pretrained") -> list[WeightsStatus]:
    """The status of every expected file in `folder`."""
    folder = Path(folder)
    pinned = pinned_sums(folder)
    return [check_file(folder, name, backbone, pinned.get(name)) for name, backbone in EXPECTED.items()]


def format_status(statuses: list[WeightsStatus]) -> str:
    """One block per file: present or absent, size, SHA-256, and the load result or its error."""
    lines = []
    for s in statuses:
        if not s.present:
            lines.append(
                f"{s.name}: absent; configs with model.pretrained: {s.path} (backbone {s.backbone}) need it "
                f"(pretrained/README.md says where to get it; model.pretrained: null trains from scratch)"
            )
            continue
        lines.append(f"{s.name}: {s.size:,} bytes, SHA-256 {s.sha256}")
        if s.error is None:
            lines.append(f"  loads into {s.backbone}: {s.loaded} tensors")
        else:
            lines.append(f"  does NOT load into {s.backbone}: {s.error}")
    present = [s for s in statuses if s.present]
    good = sum(1 for s in present if s.ok)
    lines.append(
        f"{good} of {len(statuses)} expected files present and loading, {len(present) - good} broken"
    )
    return "\n".join(lines)
