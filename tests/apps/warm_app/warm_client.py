"""ClientApp that reports its process and how many messages this process has handled."""

import os
import threading

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()
HANDLED = {"count": 0}  # module state: survives between messages only in a process that stays


@app.train()
def train(msg: Message, context: Context) -> Message:
    HANDLED["count"] += 1
    server_round = int(msg.content["config"]["round"])
    if server_round == int(context.run_config["raise-round"]):
        raise ValueError(f"injected failure in round {server_round}")
    if server_round == int(context.run_config["crash-round"]):  # dies once the reply is out, while idle
        threading.Timer(0.5, os._exit, (3,)).start()
    seen = int(context.state["seen"]["n"]) if "seen" in context.state else 0
    context.state["seen"] = MetricRecord({"n": seen + 1})
    metrics = MetricRecord(
        {"pid": os.getpid(), "handled": HANDLED["count"], "round": server_round, "state_seen": seen + 1}
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
