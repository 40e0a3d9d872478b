"""The clinic's privacy ledger: every DP training segment, append-only, tamper-evident.

Epsilon is a property of the whole training history at a clinic: every round's steps
compose. The ledger records each segment (round id, steps, sampling probability q, noise
multiplier sigma, clip norm, time) in a JSON file and recomputes epsilon from all of
them (:func:`fedseg_clinic.privacy.accounting.compute_epsilon_history`). Losing the ledger would
silently reset the budget, so it is never recreated once it has existed:

* every entry carries ``hash = sha256(previous hash + canonical JSON of the entry)``,
  the chain starting from a hash of the header (client id, delta): an edited, reordered
  or removed entry breaks it;
* an *anchor* file in a separate location holds the entry count and the head hash: a
  deleted or truncated ledger (whose remaining chain is still valid) disagrees with it.

The default anchor lives beside the state directory that holds the ledger, not in it
(``<state_dir>/../<state_dir name>.privacy-anchor.json``), so removing the state
directory is detected. Both files are written atomically, ledger first: a crash between
the two leaves the ledger exactly one entry ahead of the anchor, which is accepted (it
only adds spending) and the anchor is brought up to date.

This detects accidents and naive edits. Someone able to rewrite both files consistently
(the hashes are not keyed) is outside its threat model. One process writes a ledger.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import atomic_write_text
from fedseg_clinic.privacy.accounting import EpsilonReport, PrivacySegment, compute_epsilon_history

logger = logging.getLogger(__name__)

LEDGER_FORMAT = "fedseg-privacy-ledger"
ANCHOR_FORMAT = "fedseg-privacy-ledger-anchor"
VERSION = 1
_SEGMENT_FIELDS = ("round_id", "steps", "sampling_probability", "noise_multiplier",
                   "l2_norm_clip", "n_patients")


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
    """

    round_id: str
    steps: int
    sampling_probability: float
    noise_multiplier: float
    l2_norm_clip: float
    n_patients: int | None = None

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

    @classmethod
    def for_schedule(cls, round_id: str, n_patients: int, batch_size: int, steps: int,
                     noise_multiplier: float, l2_norm_clip: float) -> LedgerSegment:
        """A segment of ``steps`` Poisson-sampled steps with q = batch_size / n_patients."""
        if not 1 <= batch_size <= n_patients:
            raise FedsegError(f"ledger segment {round_id}: batch size {batch_size} must be "
                              f"in [1, N={n_patients}]")
        return cls(round_id, steps, batch_size / n_patients, float(noise_multiplier),
                   float(l2_norm_clip), n_patients)

    def privacy_segment(self) -> PrivacySegment:
        """The (q, sigma, steps) triple the accountant composes."""
        return PrivacySegment(self.sampling_probability, self.noise_multiplier, self.steps)


def default_anchor_path(ledger_path: Path) -> Path:
    """``<state_dir>/../<state_dir name>.privacy-anchor.json``: outside the state dir."""
    state_dir = ledger_path.resolve().parent
    return state_dir.parent / f"{state_dir.name}.privacy-anchor.json"


def _canonical(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _chain(previous: str, data: dict[str, Any]) -> str:
    return hashlib.sha256((previous + _canonical(data)).encode()).hexdigest()


class PrivacyLedger:
    """Append-only, hash-chained record of a clinic's DP training, with budget checks.

    Opening a ledger that does not exist (and has no anchor) creates both files; every
    call re-reads and re-verifies them from disk, so a restart (or a second open)
    continues the same history.

    Args:
        path: The ledger JSON file (e.g. ``<state_dir>/privacy_ledger.json``).
        client_id: This clinic's id; must match the one recorded in the ledger.
        delta: The delta epsilon is reported at; must match the recorded one.
        epsilon_budget: Largest epsilon allowed for the whole history; None = no limit.
        anchor_path: The anchor file; default :func:`default_anchor_path`.

    Raises:
        FedsegError: The ledger or its anchor was deleted, truncated or modified, or was
            written for another client id or delta.
    """

    def __init__(
        self,
        path: Path,
        client_id: str,
        delta: float,
        epsilon_budget: float | None,
        anchor_path: Path | None = None,
    ) -> None:
        if not client_id:
            raise FedsegError("privacy ledger: client_id must not be empty")
        if not (math.isfinite(delta) and 0.0 < delta < 1.0):
            raise FedsegError(f"privacy ledger {path}: delta={delta} must be in (0, 1)")
        if epsilon_budget is not None and not (epsilon_budget > 0.0):
            raise FedsegError(
                f"privacy ledger {path}: epsilon budget {epsilon_budget} must be > 0")
        self.path = Path(path)
        self.client_id = client_id
        self.delta = float(delta)
        self.epsilon_budget = epsilon_budget
        self.anchor_path = Path(anchor_path) if anchor_path else default_anchor_path(self.path)
        self._genesis = _chain("", {"format": LEDGER_FORMAT, "version": VERSION,
                                    "client_id": client_id, "delta": self.delta})
        if not self.path.exists() and not self.anchor_path.exists():
            logger.info("creating privacy ledger %s (anchor %s)", self.path, self.anchor_path)
            self._write([])
        self.entries()  # verify now: a broken ledger must stop the client at start

    # -- files -------------------------------------------------------------------------

    def _refuse(self, what: str) -> FedsegError:
        return FedsegError(f"privacy ledger {self.path} {what}; refusing to train")

    def _write(self, entries: list[dict[str, Any]]) -> None:
        head = entries[-1]["hash"] if entries else self._genesis
        ledger = {"format": LEDGER_FORMAT, "version": VERSION, "client_id": self.client_id,
                  "delta": self.delta, "entries": entries}
        anchor = {"format": ANCHOR_FORMAT, "version": VERSION, "client_id": self.client_id,
                  "ledger": str(self.path.resolve()), "entries": len(entries), "head": head}
        # Ledger first: a crash in between leaves it one entry ahead (see module doc).
        atomic_write_text(self.path, json.dumps(ledger, indent=1, allow_nan=False) + "\n")
        atomic_write_text(self.anchor_path, json.dumps(anchor, indent=1) + "\n")

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
        """Read and verify the ledger against its hash chain and anchor.

        Returns:
            The recorded entries, oldest first (segment fields + ``time`` + ``hash``).

        Raises:
            FedsegError: Deleted, truncated, modified, or another client's/delta's ledger.
        """
        ledger_exists, anchor_exists = self.path.exists(), self.anchor_path.exists()
        if not ledger_exists:
            raise self._refuse(f"was deleted (its anchor {self.anchor_path} exists)")
        if not anchor_exists:
            raise self._refuse(f"has lost its anchor {self.anchor_path} (deleted or moved; "
                               "restore it)")
        ledger = self._read_json(self.path, "ledger")
        anchor = self._read_json(self.anchor_path, "anchor")
        if ledger.get("format") != LEDGER_FORMAT or ledger.get("version") != VERSION:
            raise self._refuse("was modified (not a version-1 fedseg privacy ledger)")
        if ledger.get("client_id") != self.client_id or anchor.get("client_id") != self.client_id:
            raise FedsegError(
                f"privacy ledger {self.path} belongs to client {ledger.get('client_id')!r} "
                f"(anchor: {anchor.get('client_id')!r}), not {self.client_id!r}")
        if ledger.get("delta") != self.delta:
            raise FedsegError(f"privacy ledger {self.path} was kept at delta="
                              f"{ledger.get('delta')}, not delta={self.delta}")
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

    def segments(self) -> list[LedgerSegment]:
        """The recorded segments, oldest first."""
        out = []
        for entry in self.entries():
            try:
                out.append(LedgerSegment(**{k: entry.get(k) for k in _SEGMENT_FIELDS}))
            except (TypeError, FedsegError) as exc:
                raise self._refuse(f"was modified (entry {entry.get('round_id')!r} holds "
                                   f"invalid values: {exc})") from exc
        return out

    def _report(self, segments: list[LedgerSegment], n_patients: int | None = None
                ) -> EpsilonReport:
        return compute_epsilon_history([s.privacy_segment() for s in segments], self.delta,
                                       n_patients=n_patients)

    def spent(self) -> EpsilonReport:
        """Epsilon of the whole recorded history at the ledger's delta."""
        return self._report(self.segments())

    def check_budget(self, planned: LedgerSegment) -> EpsilonReport:
        """Epsilon the history would reach with ``planned`` added; refuse beyond budget.

        Args:
            planned: The segment about to be trained.

        Returns:
            The report for history + planned.

        Raises:
            BudgetExceededError: That epsilon would exceed the budget.
            FedsegError: The ledger is broken, or delta >= 1 / planned.n_patients.
        """
        history = self.segments()
        report = self._report([*history, planned], n_patients=planned.n_patients)
        if self.epsilon_budget is not None and report.epsilon > self.epsilon_budget:
            spent = self._report(history).epsilon
            raise BudgetExceededError(
                f"privacy budget of client {self.client_id} ({self.path}): round "
                f"{planned.round_id} would bring epsilon from {spent:.4g} to "
                f"{report.epsilon:.4g} > budget {self.epsilon_budget:g} at delta="
                f"{self.delta:g}; refusing to train")
        return report

    def record(self, segment: LedgerSegment) -> EpsilonReport:
        """Append a trained segment (always: it has happened) and return the new total.

        Args:
            segment: What was trained.

        Returns:
            Epsilon of the history including ``segment``.

        Raises:
            FedsegError: The ledger is broken (nothing is written then).
        """
        entries = self.entries()
        body = asdict(segment)
        body["time"] = datetime.now(UTC).isoformat(timespec="seconds")
        previous = entries[-1]["hash"] if entries else self._genesis
        entries.append({**body, "hash": _chain(previous, body)})
        self._write(entries)
        logger.info("privacy ledger %s: recorded round %s (%d steps, q=%.4g, sigma=%.4g)",
                    self.path, segment.round_id, segment.steps,
                    segment.sampling_probability, segment.noise_multiplier)
        return self.spent()
