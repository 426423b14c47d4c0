import time
import uuid

# Fixed when the module loads, so each execution environment answers with its own id.
INSTANCE_ID = uuid.uuid4().hex


def handler(event, context):
    time.sleep(0.1)
    return {"instance": INSTANCE_ID}
