"""ServerApp: ``num-rounds`` rounds of one train message per node; every reply is written to ``out-file``."""

import json
import time

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def _one_round(grid: Grid, nodes: list[int], server_round: int) -> list[dict]:
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"round": server_round})}),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
            group_id=str(server_round),
        )
        for node in nodes
    ]
    waiting = set(grid.push_messages(messages))
    replies = []
    while waiting:
        for reply in grid.pull_messages(waiting):
            waiting.discard(reply.metadata.reply_to_message_id)
            if reply.has_error():
                replies.append({"error": reply.error.reason, "code": reply.error.code})
            else:
                replies.append(dict(reply.content["metrics"]))
        if waiting:
            time.sleep(0.1)
    return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes: list[int] = []
    while not nodes:
        nodes = sorted(grid.get_node_ids())
        time.sleep(0.1)
    rounds = []
    for server_round in range(1, int(context.run_config["num-rounds"]) + 1):
        if server_round > 1:
            time.sleep(float(context.run_config["pause"]))
        t0 = time.time()
        rounds.append(
            {
                "round": server_round,
                "replies": _one_round(grid, nodes, server_round),
                "seconds": time.time() - t0,
            }
        )
    with open(context.run_config["out-file"], "w") as f:
        json.dump(rounds, f)
