"""The server's side of secure aggregation, run inside FEDn's hooks process.

:func:`server_functions_source` returns the ServerFunctions class FEDn executes; it
delegates to :class:`SecAggServer`, which keeps the protocol state of one session:

- ``client_settings`` (once per round, the same dict for every client): the round's
  phase, the public keys of the clinics keyed for this round, every clinic's session
  public key, and during a recovery the encrypted shares addressed to each survivor.
- ``aggregate``: records each answer's keys and shares for the next round, sums the
  masked updates in the ring, and either unmasks (everybody keyed answered), parks the
  masked sum until the next round recovers the dropped clinics' keys (enough survivors,
  shares distributed), or fails the round cleanly: the global model stays as it was and
  the journal says why.

The server never holds an unmasked single update: it only ever adds masked ones, and
refuses to unmask a sum of fewer clinics than the threshold.

Every round appends one JSON line to a journal file (``fedseg run`` reads it into
run.json): phase, status (``keys``, ``ok``, ``pending``, ``recovered``, ``failed``), the
clinics keyed, masked and dropped, and the reason of a failure.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.orchestration.session import delegating_server_functions_source
from fedseg_clinic.io import atomic_write_text
from fedseg_clinic.privacy import secagg
from fedseg_clinic.privacy.secagg_clinic import METADATA_KEY, SETTINGS_KEY

logger = logging.getLogger(__name__)


class SecAggServer:
    """Protocol state of one session on the server."""

    def __init__(self, session: str, settings_by_round: list[dict[str, Any]],
                 journal: Path | None = None) -> None:
        """Start a session's state.

        Args:
            session: Unique per session (binds keys, shares and masks to it).
            settings_by_round: Per-round client settings (rounds past the end keep the last).
            journal: JSON-lines file for the per-round outcome, or None.
        """
        self.session = session
        self.table = settings_by_round or [{}]
        self.journal = journal
        self.round = 0
        self.c_pub: dict[str, str] = {}
        self.keys: dict[int, dict[str, str]] = {}      # round -> client -> round public key
        self.shares: dict[int, dict[str, dict[str, Any]]] = {}  # round -> owner -> shares
        self.pending: dict[str, Any] | None = None

    # ------------------------------------------------------------- settings
    def client_settings(self) -> dict[str, Any]:
        """Round k's settings: the experiment's, plus the ``secagg`` request (JSON)."""
        self.round += 1
        k = self.round
        payload: dict[str, Any] = {"v": 1, "session": self.session, "round": k,
                                   "phase": "recover" if self.pending else "train",
                                   "keyed": self.keys.get(k, {}), "c_pk": dict(self.c_pub)}
        if self.pending:
            p = self.pending
            owners = self.shares.get(p["round"], {})
            payload["recover"] = {
                "round": p["round"], "dropped": p["dropped"], "survivors": p["survivors"],
                "threshold": p["threshold"],
                "shares": {s: {d: owners[d]["shares"][s] for d in p["dropped"]
                               if s in owners.get(d, {}).get("shares", {})}
                           for s in p["survivors"]}}
        base = dict(self.table[min(k, len(self.table)) - 1])
        base[SETTINGS_KEY] = json.dumps(payload, sort_keys=True)
        return base

    # ------------------------------------------------------------ aggregate
    def aggregate(self, previous_global: list[np.ndarray],
                  client_updates: dict[str, Any]) -> list[np.ndarray]:
        """The new global model (or ``previous_global`` unchanged; the journal says why)."""
        tic = time.monotonic()
        k = self.round
        try:
            answers, models = self._read_answers(k, client_updates)
            if self.pending:
                record, new = self._recover(previous_global, answers)
            else:
                record, new = self._train_round(k, previous_global, answers, models)
        except Exception as exc:
            # FEDn retires a hook that raises and falls back to its own FedAvg, which on
            # masked updates would publish noise: fail this round here instead.
            logger.exception("secure aggregation: aggregate failed")
            self.pending = None
            record = self._fail({"phase": "?"}, f"internal error: {type(exc).__name__}: {exc}")
            new = previous_global
        record.update(fedn_round=k, seconds=round(time.monotonic() - tic, 4))
        self._log(record)
        return new

    def _read_answers(self, k: int, client_updates: dict[str, Any]
                      ) -> tuple[dict[str, dict[str, Any]], dict[str, list[np.ndarray]]]:
        answers, models = {}, {}
        for cid, entry in client_updates.items():
            model, meta = entry[0], entry[1]
            try:
                answer = json.loads(meta[METADATA_KEY])
                if int(answer["round"]) != k:
                    raise ValueError(f"answer for round {answer['round']}")
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("secagg: ignoring client %s in round %d (%s)", cid, k, exc)
                continue
            answers[cid], models[cid] = answer, model
            self.c_pub[cid] = answer["c_pk"]
            self.keys.setdefault(k + 1, {})[cid] = answer["next_s_pk"]
            if "shares" in answer:
                self.shares.setdefault(k + 1, {})[cid] = {"threshold": int(answer["threshold"]),
                                                          "shares": answer["shares"]}
        # Keys of rounds before this one (or before the pending one) are never needed again.
        for table in (self.keys, self.shares):
            floor = self.pending["round"] if self.pending else k
            for r in [r for r in table if r < floor]:
                del table[r]
        return answers, models

    def _train_round(self, k: int, previous_global: list[np.ndarray],
                     answers: dict[str, dict[str, Any]], models: dict[str, list[np.ndarray]]
                     ) -> tuple[dict[str, Any], list[np.ndarray]]:
        keyed = sorted(self.keys.get(k, {}))
        masked = sorted(c for c, a in answers.items() if a.get("masked") and c in keyed)
        dropped = sorted(set(keyed) - set(masked))
        record: dict[str, Any] = {"phase": "train", "keyed": keyed, "masked": masked,
                                  "dropped": dropped}
        if not masked:
            record["status"] = "keys"
            return record, previous_global
        try:
            ddp = self._ddp_mode(answers, masked)
        except ValueError as exc:
            return self._fail(record, str(exc)), previous_global
        if ddp is not None:
            record["dp_mode"] = "distributed"
        total = secagg.ring_zeros([np.shape(g) for g in previous_global])
        weight = 0
        try:
            for c in masked:
                secagg.ring_add(total, models[c])
                weight += int(answers[c]["weight"])
        except (secagg.SecAggError, KeyError, ValueError) as exc:
            return self._fail(record, f"a masked update is malformed ({exc})"), previous_global
        threshold = secagg.threshold_for(len(keyed))
        if not dropped:
            record["status"] = "ok"
            return record, self._apply(previous_global, total, weight, ddp)
        if len(masked) < threshold:
            return self._fail(record, f"{len(masked)} of {len(keyed)} clinics answered, "
                                      f"{threshold} needed to unmask"), previous_global
        owners = self.shares.get(k, {})
        for d in dropped:
            holders = set(owners.get(d, {}).get("shares", {})) & set(masked)
            if d not in owners:
                return self._fail(record, f"clinic {d} dropped and its round key was never "
                                          "shared (its first keyed round)"), previous_global
            if len(holders) < owners[d]["threshold"]:
                return self._fail(record, f"clinic {d} dropped; {len(holders)} holders of its "
                                          f"shares answered, {owners[d]['threshold']} needed"
                                  ), previous_global
        self.pending = {"round": k, "dropped": dropped, "survivors": masked,
                        "threshold": max(owners[d]["threshold"] for d in dropped),
                        "keys": {c: self.keys[k][c] for c in keyed}, "total": total,
                        "weight": weight, "ddp": ddp}
        record["status"] = "pending"
        record["reason"] = "masks of dropped clinics are recovered in the next round"
        return record, previous_global

    def _recover(self, previous_global: list[np.ndarray], answers: dict[str, dict[str, Any]]
                 ) -> tuple[dict[str, Any], list[np.ndarray]]:
        p, self.pending = self.pending, None
        assert p is not None
        r = p["round"]
        record: dict[str, Any] = {"phase": "recover", "of_round": r, "dropped": p["dropped"],
                                  "survivors": p["survivors"], "answered": sorted(answers)}
        owners = self.shares.get(r, {})
        total = p["total"]
        shapes = [t.shape for t in total]
        for d in p["dropped"]:
            shares = [secagg.unb64(a["revealed"][d]) for c, a in sorted(answers.items())
                      if c in p["survivors"] and d in (a.get("revealed") or {})]
            threshold = owners[d]["threshold"]
            if len(shares) < threshold:
                return self._fail(record, f"round {r}: {len(shares)} shares of dropped clinic "
                                          f"{d} revealed, {threshold} needed"), previous_global
            try:
                key = secagg.private_from_bytes(secagg.combine_key(shares, threshold))
            except (ValueError, secagg.SecAggError) as exc:
                return self._fail(record, f"round {r}: key of {d} not rebuilt ({exc})"
                                  ), previous_global
            if secagg.b64(secagg.public_bytes(key)) != p["keys"][d]:
                return self._fail(record, f"round {r}: the rebuilt key of {d} does not match "
                                          "its public key (a wrong share)"), previous_global
            for s in p["survivors"]:
                # Survivor s applied sign(s, d) * mask(s, d); take it back out.
                mask = secagg.prg_mask(secagg.mask_seed(key, secagg.unb64(p["keys"][s]),
                                                        f"{self.session}|{r}"), shapes)
                secagg.ring_add(total, mask, -secagg.pair_sign(s, d))
        record["status"] = "recovered"
        if p.get("ddp") is not None:
            record["dp_mode"] = "distributed"
        return record, self._apply(previous_global, total, p["weight"], p.get("ddp"))

    # -------------------------------------------------------------- helpers
    @staticmethod
    def _ddp_mode(answers: dict[str, dict[str, Any]], masked: list[str]
                  ) -> dict[str, float] | None:
        """The distributed-DP step parameters all masked answers agree on, or None.

        Raises:
            ValueError: some clinics sent distributed-DP sums and others model updates,
                or they disagree on the scale or learning rate (the sum would be garbage).
        """
        modes = {c: answers[c].get("ddp") for c in masked}
        if all(m is None for m in modes.values()):
            return None
        if any(m is None for m in modes.values()):
            plain = sorted(c for c, m in modes.items() if m is None)
            raise ValueError(f"clinics {', '.join(plain)} sent model updates, the others "
                             "distributed-DP gradient sums: every clinic needs the same "
                             "privacy.distributed")
        values = {(float(m["scale"]), float(m["learning_rate"])) for m in modes.values()}
        if len(values) != 1:
            raise ValueError(f"clinics disagree on the distributed-DP scale / learning rate "
                             f"{sorted(values)}: every clinic needs the same l2_norm_clip "
                             "and learning_rate")
        scale, lr = values.pop()
        if not (scale > 0 and lr > 0):
            raise ValueError(f"distributed DP: scale {scale} and learning rate {lr} must be > 0")
        return {"scale": scale, "learning_rate": lr}

    @staticmethod
    def _apply(previous_global: list[np.ndarray], total: list[np.ndarray], weight: int,
               ddp: dict[str, float] | None = None) -> list[np.ndarray]:
        """The new global model from the unmasked sum.

        FedAvg: the sum is of fixed-point weighted deltas. Distributed DP: it is the
        noised integer sum Z of clipped patient gradients; the step is one of DP-GD on
        the federation, ``w - lr * Z / (scale * total patients)`` (post-processing).
        """
        if ddp is None:
            mean = secagg.dequantise(total, weight)
        else:
            if weight <= 0:
                raise secagg.SecAggError(f"total weight {weight}: nothing to average")
            step = ddp["learning_rate"] / (ddp["scale"] * float(weight))
            mean = [-step * np.asarray(t, np.uint64).view(np.int64).astype(np.float64)
                    for t in total]
        return [(np.asarray(g, np.float64) + m).astype(np.asarray(g).dtype)
                for g, m in zip(previous_global, mean, strict=True)]

    def _fail(self, record: dict[str, Any], reason: str) -> dict[str, Any]:
        logger.error("secure aggregation: round failed, global model unchanged: %s", reason)
        record.update(status="failed", reason=reason)
        return record

    def _log(self, record: dict[str, Any]) -> None:
        if self.journal is None:
            return
        old = self.journal.read_text() if self.journal.is_file() else ""
        atomic_write_text(self.journal, old + json.dumps(record, sort_keys=True) + "\n")


def server_functions_source(settings_by_round: list[dict[str, Any]], nonce: str,
                            journal: Path | None) -> str:
    """Source of the ServerFunctions class FEDn's hooks process runs for a secure session.

    The hooks process imports fedseg (it runs from fedseg's environment); the class
    itself only forwards to :class:`SecAggServer`.
    """
    if not settings_by_round:
        raise ValueError("settings_by_round must not be empty")
    literal = json.dumps(settings_by_round, sort_keys=True, allow_nan=False)
    journal_literal = json.dumps(str(journal) if journal else None)
    return delegating_server_functions_source("secure", nonce, [
        "import json",
        "from pathlib import Path",
        "from fedseg.orchestration.secure_aggregation import SecAggServer",
        f"journal = json.loads({journal_literal!r})",
        f"self.server = SecAggServer({nonce!r}, json.loads({literal!r}),",
        "                           Path(journal) if journal else None)",
    ])


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The journal's records (empty when there is none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
