"""lm-eval's `local-completions` model on the agp_mc task (agp_mc.yaml, items.jsonl) against a
running `agp serve`, offline: every connection and name lookup that is not the loopback
interface fails (and is counted), and datasets / the hub are told to stay offline.

    python run_lm_eval.py BASE_URL OUT.json BATCH_SIZE NUM_CONCURRENT

BASE_URL is the server (http://127.0.0.1:PORT). The tokenizer is the server's own
(`tokenizer_backend=remote`: /tokenizer_info, /tokenize, /detokenize), so no tokenizer
is fetched; requests go as token ids. OUT.json gets the task's metrics, every item's
(context, continuation) pairs with the loglikelihoods lm-eval read from the server, and
the network accesses that were refused.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
refused: list[str] = []


def loopback_only() -> None:
    """Refuse (and note) any connection or name lookup beyond this machine's loopback."""
    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            refused.append(f"connect {address[0]}:{address[1]}")
            raise OSError(f"network access refused (offline test): {address}")

    def guarded_connect(self, address):
        check(self, address)
        return connect(self, address)

    def guarded_connect_ex(self, address):
        check(self, address)
        return connect_ex(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and name not in LOOPBACK:
            refused.append(f"lookup {name}")
            raise socket.gaierror(f"name lookup refused (offline test): {name}")
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex = guarded_connect, guarded_connect_ex
    socket.getaddrinfo = guarded_getaddrinfo


def main(base_url: str, out: str, batch_size: int, num_concurrent: int) -> None:
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    loopback_only()
    os.chdir(HERE)                                   # the task's data_files are relative to here

    from lm_eval import evaluator, simple_evaluate
    from lm_eval.tasks import TaskManager

    # Scoring the task needs neither torch nor transformers (the tokenizer is the server's).
    # lm-eval's report of the machine (`add_env_info`: torch's collect_env, which runs pip,
    # nvidia-smi, ... in a dozen child processes) and its torch seed would import both, for parts
    # of the results this script does not write: without them its CPU time went from 6.2-6.9 s
    # to 2.7-3.4 s.
    evaluator.add_env_info = lambda results: None
    results = simple_evaluate(
        model="local-completions",
        model_args={"model": "tiny", "base_url": f"{base_url}/v1/completions", "tokenizer_backend": "remote",
                    "num_concurrent": num_concurrent, "max_retries": 1, "timeout": 120},
        batch_size=batch_size,
        tasks=["agp_mc"],
        task_manager=TaskManager(include_path=str(HERE), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        torch_random_seed=None,
    )
    items = []
    for sample in results["samples"]["agp_mc"]:
        args = sample["arguments"]
        pairs = [list(a.values()) if isinstance(a, dict) else list(a)
                 for a in (args.values() if isinstance(args, dict) else args)]
        items.append({"doc_id": sample["doc_id"], "target": sample["target"], "pairs": pairs,
                      "loglikelihoods": [r[0][0] for r in sample["resps"]],
                      "is_greedy": [r[0][1] for r in sample["resps"]], "acc": sample["acc"]})
    Path(out).write_text(json.dumps({"metrics": results["results"]["agp_mc"], "items": items,
                                     "refused": refused}, default=str))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
