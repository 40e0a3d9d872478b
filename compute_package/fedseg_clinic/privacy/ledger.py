"""The privacy ledger of a clinic's data set: every DP training segment, append-only.

Epsilon is a property of the patients, not of a run: every round that ever trained on a
clinic's patients composes, whichever run, session or network asked for it. So the
ledger lives with the data, in the data set's *privacy folder* (default
``<data_dir>/.fedseg-privacy/``, mode 0700; files 0600), never in a run folder:

* ``ledger-<data id>.json``: one ledger per data set, keyed by :func:`data_identity`
  (a hash of the training patients' pseudonyms). Each entry records one segment (round
  id, steps, sampling probability q, noise multiplier sigma, clip norm), who trained it
  (client name, run) and when; epsilon is recomputed from all of them
  (:func:`fedseg_clinic.privacy.accounting.compute_epsilon_history`) at whatever delta is asked.
* ``.lock``: every read-check-write of any ledger in the folder holds an exclusive
  ``fcntl.flock`` on it, so two trainings (or two processes recording) at once can
  neither overspend nor lose an entry.
* ``resets.jsonl`` and ``reset-archive/``: :func:`reset_ledgers` is the only way to start
  over; it logs who, when, why and what was spent, and keeps the old ledger.

Budget checks compose *every* ledger in the folder, not only the current data id: when
a clinic's training set changes (a patient added), its id changes, and the patients it
shares with the earlier set must still carry the earlier rounds. This over-counts for
new patients (never under-counts for anyone).

**Record before train.** :meth:`PrivacyLedger.reserve` checks the budget and appends the
segment in one locked step *before* the round trains: a crash during training leaves
the epsilon counted (a conservative error), never a round that trained unrecorded.

Tamper evidence (kept from version 1):

* every entry carries ``hash = sha256(previous hash + canonical JSON of the entry)``,
  the chain starting from a hash of the header (data id): an edited, reordered or
  removed entry breaks it;
* an *anchor* file outside the privacy folder (``<data_dir>/.fedseg-privacy-anchors/``)
  holds the entry count and the head hash: a deleted or truncated ledger (whose
  remaining chain is still valid) disagrees with it, and so does a deleted folder.

Both files are written atomically, ledger first: a crash between the two leaves the
ledger exactly one entry ahead of the anchor, which is accepted (it only adds spending)
and the anchor is brought up to date. This detects accidents and naive edits; someone
able to rewrite both files consistently (the hashes are not keyed) is outside its
threat model (docs/privacy-model.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import PRIVATE_DIR, PRIVATE_FILE, atomic_write_text
from fedseg_clinic.privacy import skellam as skellam_mech
from fedseg_clinic.privacy.accounting import EpsilonReport, PrivacySegment, compute_epsilon_history
from fedseg_clinic.privacy.skellam import SkellamSegment

logger = logging.getLogger(__name__)

LEDGER_FORMAT = "fedseg-privacy-ledger"
ANCHOR_FORMAT = "fedseg-privacy-ledger-anchor"
VERSION = 2
PRIVACY_DIR_NAME = ".fedseg-privacy"
LOCK_NAME = ".lock"
RESET_LOG = "resets.jsonl"
RESET_ARCHIVE = "reset-archive"
_LEDGER_RE = re.compile(r"^ledger-([0-9a-f]{16,64})\.json$")
_SEGMENT_FIELDS = ("round_id", "steps", "sampling_probability", "noise_multiplier",
                   "l2_norm_clip", "n_patients")
# Only distributed-DP entries carry these (Gaussian entries keep the version-2 layout).
_DISTRIBUTED_FIELDS = ("mechanism", "skellam")
_SKELLAM_KEYS = ("variance", "share_variance", "l2_sensitivity", "l1_sensitivity",
                 "honest_shares", "clinics", "clip_units")


class BudgetExceededError(FedsegError):
    """The next training segment would take epsilon past the clinic's budget."""


@dataclass(frozen=True)
class LedgerSegment:
    """One training segment (usually one federated round at this clinic).

    Attributes:
        round_id: The round's id (free text, e.g. the FEDn round id).
        steps: DP-SGD steps taken (>= 0).
        sampling_probability: Poisson q = B / N of each step, in [0, 1].
        noise_multiplier: sigma (>= 0; 0 means no privacy: epsilon becomes inf).
        l2_norm_clip: Per-patient clip norm (> 0); recorded for audits.
        n_patients: N, if known; lets the budget check refuse delta >= 1/N.
        mechanism: "gaussian" (DP-SGD steps) or "skellam" (distributed DP rounds under
            secure aggregation: q = 1, one release per step; ``skellam`` holds the
            aggregate variance the guarantee assumes, the clinic's own share, the integer
            sensitivities, the honest shares assumed and the clinics of the round).
        skellam: The Skellam parameters (mechanism "skellam" only).
    """

    round_id: str
    steps: int
    sampling_probability: float
    noise_multiplier: float
    l2_norm_clip: float
    n_patients: int | None = None
    mechanism: str = "gaussian"
    skellam: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.round_id, str) or not self.round_id:
            raise FedsegError(f"ledger segment: round_id={self.round_id!r} must be a "
                              "non-empty string")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise FedsegError(f"ledger segment {self.round_id}: steps={self.steps!r} must be "
                              "an integer >= 0")
        if not (math.isfinite(self.sampling_probability)
                and 0.0 <= self.sampling_probability <= 1.0):
            raise FedsegError(f"ledger segment {self.round_id}: sampling_probability="
                              f"{self.sampling_probability} must be in [0, 1]")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0.0):
            raise FedsegError(f"ledger segment {self.round_id}: noise_multiplier="
                              f"{self.noise_multiplier} must be a finite number >= 0")
        if not (math.isfinite(self.l2_norm_clip) and self.l2_norm_clip > 0.0):
            raise FedsegError(f"ledger segment {self.round_id}: l2_norm_clip="
                              f"{self.l2_norm_clip} must be a finite number > 0")
        if self.n_patients is not None and (isinstance(self.n_patients, bool)
                                            or not isinstance(self.n_patients, int)
                                            or self.n_patients < 1):
            raise FedsegError(f"ledger segment {self.round_id}: n_patients="
                              f"{self.n_patients!r} must be an integer >= 1")
        if self.mechanism == "gaussian" and self.skellam is None:
            return
        params = self.skellam if isinstance(self.skellam, dict) else {}
        if self.mechanism != skellam_mech.MECHANISM or set(params) != set(_SKELLAM_KEYS) or not all(
                isinstance(params[k], int | float) and math.isfinite(params[k])
                and params[k] > 0 for k in _SKELLAM_KEYS) or self.sampling_probability != 1.0:
            raise FedsegError(f"ledger segment {self.round_id}: mechanism={self.mechanism!r} "
                              f"with skellam={self.skellam!r} is not a valid distributed-DP "
                              "round")

    @classmethod
    def for_distributed(cls, round_id: str, n_patients: int, noise_multiplier: float,
                        l2_norm_clip: float, honest_shares: int, clinics: int,
                        clip_units: int = skellam_mech.CLIP_UNITS) -> LedgerSegment:
        """One distributed-DP round: the full-batch Skellam release of this clinic's sum.

        Args:
            round_id: The round's id.
            n_patients: N (all of them contribute: q = 1).
            noise_multiplier: z: the aggregate's Skellam std is z * clip_units.
            l2_norm_clip: C (float units), for the record.
            honest_shares: m, the honest shares the guarantee assumes.
            clinics: The clinics keyed for the round (n).
            clip_units: s * C.
        """
        seg = skellam_mech.segment_for(noise_multiplier, 1, clip_units)
        params = {"variance": seg.variance, "share_variance": seg.variance / honest_shares,
                  "l2_sensitivity": seg.l2_sensitivity, "l1_sensitivity": seg.l1_sensitivity,
                  "honest_shares": int(honest_shares), "clinics": int(clinics),
                  "clip_units": int(clip_units)}
        return cls(round_id, 1, 1.0, float(noise_multiplier), float(l2_norm_clip),
                   n_patients, skellam_mech.MECHANISM, params)

    @classmethod
    def for_schedule(cls, round_id: str, n_patients: int, batch_size: int, steps: int,
                     noise_multiplier: float, l2_norm_clip: float) -> LedgerSegment:
        """A segment of ``steps`` Poisson-sampled steps with q = batch_size / n_patients."""
        if not 1 <= batch_size <= n_patients:
            raise FedsegError(f"ledger segment {round_id}: batch size {batch_size} must be "
                              f"in [1, N={n_patients}]")
        return cls(round_id, steps, batch_size / n_patients, float(noise_multiplier),
                   float(l2_norm_clip), n_patients)

    def privacy_segment(self, alone: bool = False) -> PrivacySegment | SkellamSegment:
        """What the accountant composes: (q, sigma, steps), or the Skellam release.

        Args:
            alone: For a distributed round, the release as protected by this clinic's own
                share only (every other clinic colluding with the server).
        """
        if self.skellam is not None:
            p = self.skellam
            return SkellamSegment(p["share_variance"] if alone else p["variance"],
                                  p["l2_sensitivity"], p["l1_sensitivity"], self.steps)
        return PrivacySegment(self.sampling_probability, self.noise_multiplier, self.steps)


def data_identity(patient_pseudonyms: Iterable[str]) -> str:
    """The data set's identity: sha256 of its sorted, distinct training pseudonyms (16 hex).

    Args:
        patient_pseudonyms: The pseudonymous ids of the patients trained on.

    Raises:
        FedsegError: No pseudonyms.
    """
    ids = sorted({str(p) for p in patient_pseudonyms})
    if not ids:
        raise FedsegError("data identity: no training patients")
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def default_privacy_dir(data_dir: Path) -> Path:
    """``<data_dir>/.fedseg-privacy``: the ledgers travel with the clinic's data."""
    return Path(data_dir).resolve() / PRIVACY_DIR_NAME


def ledger_path(privacy_dir: Path, data_id: str) -> Path:
    """``<privacy_dir>/ledger-<data_id>.json``."""
    return Path(privacy_dir) / f"ledger-{data_id}.json"


def default_anchor_path(ledger_file: Path) -> Path:
    """``<dir>/../<dir name>-anchors/<ledger stem>.anchor.json``: outside the ledger's dir.

    Removing the whole privacy folder is therefore detected too.
    """
    folder = Path(ledger_file).resolve().parent
    return folder.parent / f"{folder.name}-anchors" / f"{Path(ledger_file).stem}.anchor.json"


def _private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700: ledgers reveal who trained when."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, PRIVATE_DIR)
    return path


def _write_private(path: Path, text: str) -> None:
    """Write a 0600 file atomically in a 0700 folder."""
    _private_dir(path.parent)
    atomic_write_text(path, text, mode=PRIVATE_FILE)


@contextlib.contextmanager
def folder_lock(privacy_dir: Path) -> Iterator[None]:
    """Hold the privacy folder's exclusive lock (``fcntl.flock`` on ``.lock``).

    Blocks until no other process (or open file description) holds it. The lock file is
    never deleted: deleting it while held would let a third process lock a new inode.
    """
    folder = _private_dir(Path(privacy_dir))
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _canonical(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _chain(previous: str, data: dict[str, Any]) -> str:
    return hashlib.sha256((previous + _canonical(data)).encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class PrivacyLedger:
    """Append-only, hash-chained, locked record of one data set's DP training.

    Opening a ledger that does not exist (and has no anchor) creates both files; every
    call takes the folder lock and re-reads and re-verifies the files, so restarts,
    other runs and concurrent processes continue the same history.

    Args:
        path: The ledger JSON file (``ledger_path(privacy_dir, data_id)``).
        data_id: The data set's identity; must match the one recorded in the ledger.
        delta: The delta epsilon is reported and budgeted at (not a property of the
            ledger: the recorded segments compose at any delta).
        epsilon_budget: Largest epsilon allowed for the whole history; None = no limit.
        anchor_path: The anchor file; default :func:`default_anchor_path`.

    Raises:
        FedsegError: The ledger or its anchor was deleted, truncated or modified, or was
            written for another data set.
    """

    def __init__(
        self,
        path: Path,
        data_id: str,
        delta: float,
        epsilon_budget: float | None,
        anchor_path: Path | None = None,
    ) -> None:
        if not data_id:
            raise FedsegError("privacy ledger: data_id must not be empty")
        if not (math.isfinite(delta) and 0.0 < delta < 1.0):
            raise FedsegError(f"privacy ledger {path}: delta={delta} must be in (0, 1)")
        if epsilon_budget is not None and not (epsilon_budget > 0.0):
            raise FedsegError(
                f"privacy ledger {path}: epsilon budget {epsilon_budget} must be > 0")
        self.path = Path(path)
        self.folder = self.path.parent
        self.data_id = data_id
        self.delta = float(delta)
        self.epsilon_budget = epsilon_budget
        self.anchor_path = Path(anchor_path) if anchor_path else default_anchor_path(self.path)
        self._genesis = _chain("", {"format": LEDGER_FORMAT, "version": VERSION,
                                    "data_id": data_id})
        with folder_lock(self.folder):
            if not self.path.exists() and not self.anchor_path.exists():
                logger.info("creating privacy ledger %s (anchor %s)", self.path,
                            self.anchor_path)
                self._write([])
            self._entries()  # verify now: a broken ledger must stop the client at start

    @classmethod
    def _bare(cls, path: Path, data_id: str, delta: float) -> PrivacyLedger:
        """An unverified handle for a caller that already holds the folder lock."""
        ledger = cls.__new__(cls)
        ledger.path, ledger.folder, ledger.data_id = Path(path), Path(path).parent, data_id
        ledger.delta, ledger.epsilon_budget = float(delta), None
        ledger.anchor_path = default_anchor_path(ledger.path)
        ledger._genesis = _chain("", {"format": LEDGER_FORMAT, "version": VERSION,
                                      "data_id": data_id})
        return ledger

    # -- files -------------------------------------------------------------------------

    def _refuse(self, what: str) -> FedsegError:
        return FedsegError(f"privacy ledger {self.path} {what}; refusing to train")

    def _write(self, entries: list[dict[str, Any]]) -> None:
        head = entries[-1]["hash"] if entries else self._genesis
        ledger = {"format": LEDGER_FORMAT, "version": VERSION, "data_id": self.data_id,
                  "entries": entries}
        anchor = {"format": ANCHOR_FORMAT, "version": VERSION, "data_id": self.data_id,
                  "ledger": str(self.path.resolve()), "entries": len(entries), "head": head}
        # Ledger first: a crash in between leaves it one entry ahead (see module doc).
        _write_private(self.path, json.dumps(ledger, indent=1, allow_nan=False) + "\n")
        _write_private(self.anchor_path, json.dumps(anchor, indent=1) + "\n")

    def _read_json(self, path: Path, what: str) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise self._refuse(f"was modified ({what} {path} is unreadable: "
                               f"{type(exc).__name__})") from exc
        if not isinstance(data, dict):
            raise self._refuse(f"was modified ({what} {path} is not a JSON object)")
        return data

    def entries(self) -> list[dict[str, Any]]:
        """Read and verify the ledger against its hash chain and anchor (locked).

        Returns:
            The recorded entries, oldest first (segment fields, ``client``, ``run``,
            ``delta``, ``time`` and ``hash``).

        Raises:
            FedsegError: Deleted, truncated, modified, or another data set's ledger.
        """
        with folder_lock(self.folder):
            return self._entries()

    def _entries(self) -> list[dict[str, Any]]:
        """:meth:`entries` for a caller that holds the folder lock."""
        ledger_exists, anchor_exists = self.path.exists(), self.anchor_path.exists()
        if not ledger_exists:
            raise self._refuse(f"was deleted (its anchor {self.anchor_path} exists; "
                               "`fedseg privacy reset` is the way to start over)")
        if not anchor_exists:
            raise self._refuse(f"has lost its anchor {self.anchor_path} (deleted or moved; "
                               "restore it)")
        ledger = self._read_json(self.path, "ledger")
        anchor = self._read_json(self.anchor_path, "anchor")
        if ledger.get("format") != LEDGER_FORMAT or ledger.get("version") != VERSION:
            raise self._refuse(f"was modified (not a version-{VERSION} fedseg privacy ledger)")
        if ledger.get("data_id") != self.data_id or anchor.get("data_id") != self.data_id:
            raise FedsegError(
                f"privacy ledger {self.path} belongs to data set {ledger.get('data_id')!r} "
                f"(anchor: {anchor.get('data_id')!r}), not {self.data_id!r}")
        entries = ledger.get("entries")
        if not isinstance(entries, list):
            raise self._refuse("was modified (no entry list)")
        head = self._genesis
        hashes = [head]
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or "hash" not in entry:
                raise self._refuse(f"was modified (entry {index} is malformed)")
            body = {k: v for k, v in entry.items() if k != "hash"}
            head = _chain(head, body)
            if entry["hash"] != head:
                raise self._refuse(f"was modified (entry {index}, round "
                                   f"{entry.get('round_id')!r}, fails its hash check)")
            hashes.append(head)
        count = anchor.get("entries")
        if not isinstance(count, int) or count < 0:
            raise self._refuse(f"was modified (anchor {self.anchor_path} is malformed)")
        if count == len(entries) and anchor.get("head") == head:
            return entries
        if count == len(entries) - 1 and anchor.get("head") == hashes[count]:
            logger.warning("privacy ledger %s is one entry ahead of its anchor (interrupted "
                           "write); updating the anchor", self.path)
            self._write(entries)
            return entries
        if count > len(entries):
            raise self._refuse(f"was truncated or reset: it holds {len(entries)} entries, "
                               f"its anchor {self.anchor_path} records {count}")
        raise self._refuse(f"was modified: its head does not match anchor {self.anchor_path}")

    # -- accounting --------------------------------------------------------------------

    def _segments(self, entries: list[dict[str, Any]]) -> list[LedgerSegment]:
        out = []
        for entry in entries:
            try:
                fields = {k: entry.get(k) for k in _SEGMENT_FIELDS}
                fields.update({k: entry[k] for k in _DISTRIBUTED_FIELDS if k in entry})
                out.append(LedgerSegment(**fields))
            except (TypeError, FedsegError) as exc:
                raise self._refuse(f"was modified (entry {entry.get('round_id')!r} holds "
                                   f"invalid values: {exc})") from exc
        return out

    def segments(self) -> list[LedgerSegment]:
        """The recorded segments of this data set, oldest first."""
        return self._segments(self.entries())

    def _sibling_segments(self) -> list[LedgerSegment]:
        """Segments of the folder's other data sets' ledgers (caller holds the lock)."""
        out: list[LedgerSegment] = []
        for other in sorted(self.folder.glob("ledger-*.json")):
            match = _LEDGER_RE.match(other.name)
            if match is None or other.resolve() == self.path.resolve():
                continue
            sibling = PrivacyLedger._bare(other, match.group(1), self.delta)
            found = sibling._segments(sibling._entries())
            if found:
                logger.info("privacy ledger %s: composing %d segment(s) of data set %s kept "
                            "in the same folder (its patients may overlap)", self.path,
                            len(found), sibling.data_id)
            out.extend(found)
        return out

    def _history(self) -> list[LedgerSegment]:
        """Everything the budget composes: this data set's and its siblings' segments."""
        return self._segments(self._entries()) + self._sibling_segments()

    def history(self) -> list[LedgerSegment]:
        """Every segment the budget composes (this data set's and its siblings'), locked."""
        with folder_lock(self.folder):
            return self._history()

    def _report(self, segments: list[LedgerSegment], n_patients: int | None = None
                ) -> EpsilonReport:
        return compute_epsilon_history([s.privacy_segment() for s in segments], self.delta,
                                       n_patients=n_patients)

    def spent_alone(self) -> EpsilonReport:
        """Epsilon of the history if every distributed round had only this clinic's share.

        Equal to :meth:`spent` without distributed rounds: the worst case of the trust
        assumption (all other clinics collude with the server).
        """
        with folder_lock(self.folder):
            return compute_epsilon_history([s.privacy_segment(alone=True)
                                            for s in self._history()], self.delta)

    def spent(self) -> EpsilonReport:
        """Epsilon of the whole recorded history (siblings included) at this delta."""
        with folder_lock(self.folder):
            return self._report(self._history())

    def _check(self, history: list[LedgerSegment], planned: LedgerSegment) -> EpsilonReport:
        report = self._report([*history, planned], n_patients=planned.n_patients)
        if self.epsilon_budget is not None and report.epsilon > self.epsilon_budget:
            spent = self._report(history).epsilon
            raise BudgetExceededError(
                f"privacy budget of data set {self.data_id} ({self.path}): round "
                f"{planned.round_id} would bring epsilon from {spent:.4g} to "
                f"{report.epsilon:.4g} > budget {self.epsilon_budget:g} at delta="
                f"{self.delta:g}; refusing to train")
        return report

    def check_budget(self, planned: LedgerSegment) -> EpsilonReport:
        """Epsilon the history would reach with ``planned`` added; refuse beyond budget.

        Writes nothing: use :meth:`reserve` to train (a check then a later record would
        let a concurrent training slip in between).

        Raises:
            BudgetExceededError: That epsilon would exceed the budget.
            FedsegError: The ledger is broken, or delta >= 1 / planned.n_patients.
        """
        with folder_lock(self.folder):
            return self._check(self._history(), planned)

    def _append(self, entries: list[dict[str, Any]], segment: LedgerSegment,
                client: str, run: str) -> None:
        body: dict[str, Any] = asdict(segment)
        if segment.skellam is None:
            for key in _DISTRIBUTED_FIELDS:  # DP-SGD entries: the version-2 layout as before
                del body[key]
        body.update({"client": client, "run": run, "delta": self.delta, "time": _now()})
        previous = entries[-1]["hash"] if entries else self._genesis
        entries.append({**body, "hash": _chain(previous, body)})
        self._write(entries)
        logger.info("privacy ledger %s: recorded round %s of %s (%s, %d steps, q=%.4g, "
                    "sigma=%.4g)", self.path, segment.round_id, client or "?",
                    segment.mechanism, segment.steps, segment.sampling_probability,
                    segment.noise_multiplier)

    def reserve(self, segment: LedgerSegment, client: str = "", run: str = ""
                ) -> EpsilonReport:
        """Check the budget and record ``segment`` in one locked step, before training.

        Args:
            segment: The round about to be trained.
            client: Who trains it (client name), for the record.
            run: Which run asked (free text), for the record.

        Returns:
            Epsilon of the history including ``segment``.

        Raises:
            BudgetExceededError: It would exceed the budget (nothing is written).
            FedsegError: The ledger is broken (nothing is written).
        """
        with folder_lock(self.folder):
            entries = self._entries()
            report = self._check(self._segments(entries) + self._sibling_segments(), segment)
            self._append(entries, segment, client, run)
            return report

    def record(self, segment: LedgerSegment, client: str = "", run: str = ""
               ) -> EpsilonReport:
        """Append a segment without a budget check (it has happened) and return the total.

        Raises:
            FedsegError: The ledger is broken (nothing is written then).
        """
        with folder_lock(self.folder):
            entries = self._entries()
            self._append(entries, segment, client, run)
            return self._report(self._segments(entries) + self._sibling_segments())


def ledgers_in(privacy_dir: Path) -> list[str]:
    """The data ids of the ledgers kept in a privacy folder, sorted."""
    folder = Path(privacy_dir)
    if not folder.is_dir():
        return []
    return sorted(m.group(1) for p in folder.iterdir()
                  if (m := _LEDGER_RE.match(p.name)) is not None)


def describe_privacy_dir(privacy_dir: Path, delta: float) -> dict[str, Any]:
    """What ``fedseg privacy show`` prints: each ledger's entries and epsilon at delta.

    Raises:
        FedsegError: A ledger is broken (named), or the folder holds none.
    """
    folder = Path(privacy_dir)
    ids = ledgers_in(folder)
    if not ids:
        raise FedsegError(f"{folder}: no privacy ledger here (nothing has been trained on "
                          "this data, or the privacy folder is elsewhere)")
    out: dict[str, Any] = {"privacy_dir": str(folder), "delta": delta, "ledgers": []}
    total: list[LedgerSegment] = []
    for data_id in ids:
        ledger = PrivacyLedger(ledger_path(folder, data_id), data_id, delta, None)
        entries = ledger.entries()
        segments = ledger._segments(entries)
        total += segments
        out["ledgers"].append({
            "data_id": data_id, "path": str(ledger.path), "anchor": str(ledger.anchor_path),
            "rounds": len(entries), "steps": sum(s.steps for s in segments),
            "epsilon": ledger._report(segments).epsilon,
            "clients": sorted({str(e.get("client", "")) for e in entries} - {""}),
            "runs": sorted({str(e.get("run", "")) for e in entries} - {""}),
            "first": entries[0]["time"] if entries else None,
            "last": entries[-1]["time"] if entries else None,
        })
    out["epsilon_all"] = compute_epsilon_history([s.privacy_segment() for s in total],
                                                 delta).epsilon
    resets = folder / RESET_LOG
    out["resets"] = ([json.loads(line) for line in resets.read_text().splitlines() if line]
                     if resets.exists() else [])
    return out


def reset_ledgers(privacy_dir: Path, reason: str, delta: float = 1e-5) -> dict[str, Any]:
    """Start a privacy folder's accounting over: the explicit, logged way.

    Every ledger and anchor is moved into ``reset-archive/<time>/`` (kept for audit,
    not counted any more) and one line is appended to ``resets.jsonl``: time, user,
    reason, and each ledger's rounds and epsilon at ``delta``. Holds the folder lock,
    so it cannot interleave with a training's reservation.

    Args:
        privacy_dir: The data set's privacy folder.
        reason: Why (required, non-empty: it is the audit trail).
        delta: The delta the logged epsilons are computed at.

    Returns:
        The logged record.

    Raises:
        FedsegError: Empty reason, no ledger there, or a broken ledger (a tampered
            ledger is archived too, and the log says it was broken).
    """
    if not reason or not reason.strip():
        raise FedsegError("privacy reset: --reason must say why the budget starts over")
    folder = Path(privacy_dir)
    # Anchors whose ledger was deleted count too: after such an accident a logged reset
    # is the way to train again.
    anchors = default_anchor_path(ledger_path(folder, "0" * 16)).parent
    orphans = ([a.name[len("ledger-"):-len(".anchor.json")]
                for a in anchors.glob("ledger-*.anchor.json")] if anchors.is_dir() else [])
    ids = sorted(set(ledgers_in(folder)) | set(orphans))
    if not ids:
        raise FedsegError(f"{folder}: no privacy ledger to reset")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    archive = folder / RESET_ARCHIVE / stamp
    record: dict[str, Any] = {"time": _now(), "user": getpass.getuser(),
                              "reason": reason.strip(), "archive": str(archive),
                              "ledgers": []}
    with folder_lock(folder):
        _private_dir(archive)
        for data_id in ids:
            path = ledger_path(folder, data_id)
            anchor = default_anchor_path(path)
            summary: dict[str, Any] = {"data_id": data_id}
            try:
                ledger = PrivacyLedger._bare(path, data_id, delta)
                segments = ledger._segments(ledger._entries())
                summary.update(rounds=len(segments),
                               epsilon=ledger._report(segments).epsilon)
            except FedsegError as exc:
                summary["broken"] = str(exc)
            for source in (path, anchor):
                if source.exists():
                    shutil.move(str(source), str(archive / source.name))
            record["ledgers"].append(summary)
        with open(folder / RESET_LOG, "a", encoding="utf-8") as log:
            os.fchmod(log.fileno(), 0o600)
            log.write(json.dumps(record, allow_nan=True) + "\n")
            log.flush()
            os.fsync(log.fileno())
    logger.warning("privacy ledgers of %s reset (%s): %s", folder, reason.strip(),
                   ", ".join(ids))
    return record
