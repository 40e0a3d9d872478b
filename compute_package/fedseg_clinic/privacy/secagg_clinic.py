"""The clinic's side of secure aggregation: keys, shares, masking, revealing shares.

FEDn rounds are one request and one answer, so the protocol is pipelined over rounds
(docs/secure-aggregation.md has the whole picture). Every answer carries the clinic's
session public key, a fresh public key for the *next* round and that key's private half
Shamir-shared and encrypted to each peer. The server's request for round k says which
clinics are keyed for round k (their round-k public keys) and the phase:

- ``train``: a keyed clinic trains, quantises ``n * (new - global)``, adds its pair
  masks and answers with the masked ring elements (uint64); a clinic that is not keyed
  (its first round, or it lost its keys in a restart) answers with keys only.
  With distributed DP (``privacy.distributed``) the clinic masks its noised integer
  gradient sum instead (privacy/skellam.py) and its answer says so (``ddp``: the scale
  and learning rate the server's step needs).
- ``recover``: some clinic dropped after the others masked in an earlier round; the
  survivors decrypt the shares of the dropped clinics' round keys addressed to them and
  reveal them, so the server can remove the dropped clinics' masks. Nobody trains.

The process must live across rounds (the callback client does): round keys are kept in
memory only, never written to disk.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedseg_clinic.privacy import secagg

SETTINGS_KEY = "secagg"
METADATA_KEY = "secagg"
# A clinic masks (and so lets the server learn a sum it is part of) only with at least
# two other keyed clinics: the sum of two updates reveals each to the other clinic.
MIN_KEYED = 3

Weights = list[np.ndarray]
TrainFn = Callable[[], tuple[Sequence[np.ndarray], dict[str, Any]]]
# Distributed DP: clinics keyed for the round -> (int64 noised sums shaped like the
# weights, metadata with ddp_scale and learning_rate).
ContributeFn = Callable[[int], tuple[Sequence[np.ndarray], dict[str, Any]]]


class SecAggClinic:
    """Per-process protocol state of one clinic (keys of the current session)."""

    def __init__(self, client_id: str) -> None:
        """Fresh keys; ``client_id`` is this client's FEDn id (how the server addresses it)."""
        self.client_id = client_id
        self.session = ""
        self.c_key = secagg.new_private_key()
        self.round_keys: dict[int, Any] = {}

    def _enter_session(self, session: str) -> None:
        if session != self.session:  # new session: new keys, nothing carried over
            self.session = session
            self.c_key = secagg.new_private_key()
            self.round_keys = {}

    def handle(self, raw_payload: str, global_weights: Weights, train: TrainFn,
               contribute: ContributeFn | None = None) -> tuple[Weights, dict[str, Any]]:
        """Answer one round's request.

        Args:
            raw_payload: The ``secagg`` client setting (JSON).
            global_weights: The global model of this round.
            train: Runs the clinic's local training, returning (weights, metadata).
            contribute: Distributed DP instead of training (privacy/skellam.py): given
                the number of keyed clinics, the clinic's noised integer gradient sum.

        Returns:
            The weights to send (masked uint64 ring elements after training, else the
            global weights unchanged) and the training metadata (``secagg`` holds the
            protocol answer as JSON; ``num_examples`` is 0 when nothing was trained).

        Raises:
            SecAggError: a malformed request, or a request an honest clinic refuses.
        """
        try:
            payload = json.loads(raw_payload)
            session, k, phase = str(payload["session"]), int(payload["round"]), payload["phase"]
            keyed = {str(c): secagg.unb64(v) for c, v in payload["keyed"].items()}
            c_pub = {str(c): secagg.unb64(v) for c, v in payload["c_pk"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise secagg.SecAggError(f"secure aggregation request: malformed ({exc})") from None
        self._enter_session(session)
        answer: dict[str, Any] = {"round": k, "c_pk": secagg.b64(secagg.public_bytes(self.c_key))}
        answer.update(self._next_round_keys(k, c_pub))
        out: Weights = [np.asarray(w) for w in global_weights]
        meta: dict[str, Any] = {"num_examples": 0}
        if phase == "train":
            own_key = self.round_keys.get(k)
            if self.client_id in keyed and own_key is not None and len(keyed) >= MIN_KEYED:
                if contribute is not None:
                    out, meta = self._masked_contribution(k, own_key, keyed, global_weights,
                                                          contribute)
                    answer["ddp"] = {"scale": float(meta["ddp_scale"]),
                                     "learning_rate": float(meta["learning_rate"])}
                else:
                    out, meta = self._masked_update(k, own_key, keyed, global_weights, train)
                answer.update(masked=True, weight=int(meta["num_examples"]))
            else:
                answer["masked"] = False
        elif phase == "recover":
            answer["revealed"] = self._reveal(payload.get("recover") or {}, c_pub)
            answer["masked"] = False
        else:
            raise secagg.SecAggError(f"secure aggregation request: unknown phase {phase!r}")
        self.round_keys = {r: key for r, key in self.round_keys.items() if r > k}
        meta = dict(meta)
        meta.update({METADATA_KEY: json.dumps(answer, sort_keys=True),
                     "secagg_phase": phase, "secagg_masked": int(bool(answer["masked"]))})
        return out, meta

    def _next_round_keys(self, k: int, c_pub: dict[str, bytes]) -> dict[str, Any]:
        """A fresh key for round k + 1, its private half shared among the known peers."""
        key = secagg.new_private_key()
        self.round_keys[k + 1] = key
        out: dict[str, Any] = {"next_s_pk": secagg.b64(secagg.public_bytes(key))}
        holders = sorted(c for c in c_pub if c != self.client_id)
        threshold = secagg.threshold_for(len(holders) + 1)
        if len(holders) >= threshold:
            shares = secagg.split_key(secagg.private_bytes(key), holders, threshold)
            out["threshold"] = threshold
            out["shares"] = {
                h: secagg.encrypt_share(self.c_key, c_pub[h], shares[h], self.session,
                                        secagg.share_aad(self.client_id, h, k + 1))
                for h in holders}
        return out

    def _masked_update(self, k: int, own_key: Any, keyed: dict[str, bytes],
                       global_weights: Weights, train: TrainFn) -> tuple[Weights, dict[str, Any]]:
        new_weights, meta = train()
        weight = int(meta["num_examples"])
        if len(new_weights) != len(global_weights):
            raise secagg.SecAggError(f"update has {len(new_weights)} tensors, "
                                     f"the global model {len(global_weights)}")
        deltas = [np.asarray(n, np.float64) - np.asarray(g, np.float64)
                  for n, g in zip(new_weights, global_weights, strict=True)]
        values = secagg.quantise(deltas, weight)
        # Why the masks with *every* keyed clinic: the server only learns the sum over
        # the clinics that answer, and recovers the masks of those that do not.
        secagg.apply_pair_masks(values, self.client_id, own_key, keyed, f"{self.session}|{k}")
        return values, meta

    def _masked_contribution(self, k: int, own_key: Any, keyed: dict[str, bytes],
                             global_weights: Weights, contribute: ContributeFn
                             ) -> tuple[Weights, dict[str, Any]]:
        sums, meta = contribute(len(keyed))
        if len(sums) != len(global_weights):
            raise secagg.SecAggError(f"contribution has {len(sums)} tensors, "
                                     f"the global model {len(global_weights)}")
        values = []
        for i, (arr, g) in enumerate(zip(sums, global_weights, strict=True)):
            arr = np.asarray(arr)
            if arr.dtype != np.int64 or arr.shape != np.shape(g):
                raise secagg.SecAggError(f"contribution tensor {i}: {arr.dtype}{arr.shape}, "
                                         f"expected int64{np.shape(g)}")
            if arr.size and int(np.max(np.abs(arr))) >= 2 ** secagg.MAX_ABS_BITS:
                raise secagg.SecAggError(f"contribution tensor {i}: too large for the ring")
            values.append(arr.view(np.uint64).copy())
        secagg.apply_pair_masks(values, self.client_id, own_key, keyed, f"{self.session}|{k}")
        return values, meta

    def _reveal(self, recover: dict[str, Any], c_pub: dict[str, bytes]) -> dict[str, str]:
        """Decrypt and reveal this clinic's shares of the dropped clinics' round keys."""
        try:
            r = int(recover["round"])
            dropped = [str(d) for d in recover["dropped"]]
            survivors = [str(s) for s in recover["survivors"]]
            threshold = int(recover["threshold"])
            mine = recover["shares"].get(self.client_id, {})
        except (KeyError, TypeError, ValueError) as exc:
            raise secagg.SecAggError(f"recovery request: malformed ({exc})") from None
        # A clinic that itself dropped in round r (now back) has nothing to reveal and
        # answers with keys only. An honest survivor reveals keys of dropped clinics
        # only, and never when the server claims fewer survivors than the threshold (the
        # "sum" would then be too few updates, perhaps one).
        if self.client_id in dropped or self.client_id not in survivors:
            return {}
        if len(survivors) < threshold or set(dropped) & set(survivors):
            raise secagg.SecAggError(f"recovery of round {r}: {len(survivors)} survivors, "
                                     f"threshold {threshold}; refusing to reveal")
        revealed = {}
        for d in dropped:
            if d in mine and d in c_pub:
                share = secagg.decrypt_share(self.c_key, c_pub[d], mine[d], self.session,
                                             secagg.share_aad(d, self.client_id, r))
                revealed[d] = secagg.b64(share)
        return revealed
