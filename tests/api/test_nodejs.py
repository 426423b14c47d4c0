"""The nodejs20.x runtime: Lambent's Node.js bootstrap, on both sandboxes."""

from __future__ import annotations

import json

import pytest

from tests.support import Tenant

pytestmark = pytest.mark.both_sandboxes

CONTEXT = """
const INSTANCE = Math.random().toString(36).slice(2);
let calls = 0;
console.log("module initialised");

exports.handler = async (event, context) => {
  calls += 1;
  console.log("handling", JSON.stringify(event));
  return {
    event,
    calls,
    instance: INSTANCE,
    version: process.version,
    requestId: context.awsRequestId,
    functionName: context.functionName,
    functionVersion: context.functionVersion,
    memoryLimitInMB: context.memoryLimitInMB,
    invokedFunctionArn: context.invokedFunctionArn,
    logGroupName: context.logGroupName,
    logStreamName: context.logStreamName,
    remainingMs: context.getRemainingTimeInMillis(),
    env: process.env,
  };
};
"""


def deploy_node(tenant: Tenant, name: str, files: dict[str, str], **config: object) -> dict:
    handler = str(config.pop("handler", "app.handler"))
    return tenant.deploy(name, files=files, runtime="nodejs20.x", handler=handler, **config)


def test_async_handler_gets_the_event_and_lambdas_context(tenant: Tenant) -> None:
    fn = deploy_node(tenant, "ctx", {"app.js": CONTEXT}, memory_mb=256, timeout_s=7)

    response = tenant.invoke("ctx", {"hello": "node"})

    assert response.status_code == 200, response.text
    assert "x-function-error" not in response.headers
    body = response.json()
    assert body["event"] == {"hello": "node"}
    assert body["version"].startswith("v20.")
    assert body["requestId"] == response.headers["x-request-id"]
    assert body["functionName"] == "ctx"
    assert body["functionVersion"] == "$LATEST"
    assert body["memoryLimitInMB"] == "256"
    assert body["invokedFunctionArn"] == fn["arn"]
    assert body["logGroupName"] == "/aws/lambda/ctx"
    assert body["logStreamName"].startswith("$LATEST/")
    assert 5000 < body["remainingMs"] <= 7000


def test_environment_is_the_functions_and_lambdas_only(tenant: Tenant) -> None:
    deploy_node(tenant, "env", {"app.js": CONTEXT}, environment={"COLOR": "blue"})

    env = tenant.invoke("env").json()["env"]

    assert env["COLOR"] == "blue"
    assert env["_HANDLER"] == "app.handler"
    assert env["AWS_EXECUTION_ENV"] == "AWS_Lambda_nodejs20.x"
    assert env["LAMBDA_TASK_ROOT"] == "/var/task"
    leaked = [k for k in env if k.startswith("LAMBENT_") and k != "LAMBENT_RUNTIME_SOCKET"]
    assert leaked == []
    assert tenant.server.admin_key not in json.dumps(env)


def test_second_call_is_warm_and_console_lines_carry_the_request_id(tenant: Tenant) -> None:
    deploy_node(tenant, "warm", {"app.js": CONTEXT})

    first = tenant.invoke("warm", {"n": 1})
    second = tenant.invoke("warm", {"n": 2})

    assert second.json()["instance"] == first.json()["instance"]
    assert second.json()["calls"] == 2
    cold = tenant.invocation(first.headers["x-request-id"])
    warm = tenant.invocation(second.headers["x-request-id"])
    assert cold["cold_start"] is True and warm["cold_start"] is False
    assert cold["logs"].count("module initialised") == 1
    assert "module initialised" not in warm["logs"]
    request_id = second.headers["x-request-id"]
    line = next(x for x in warm["logs"].splitlines() if "handling" in x)
    timestamp, logged_id, level, message = line.split("\t")
    assert timestamp.endswith("Z") and logged_id == request_id and level == "INFO"
    assert message == 'handling {"n":2}'


def test_callback_style_handler_answers_through_its_callback(tenant: Tenant) -> None:
    source = """
exports.handler = function (event, context, callback) {
  setTimeout(() => callback(null, { doubled: event.n * 2 }), 10);
};
"""
    deploy_node(tenant, "callback", {"app.js": source})

    assert tenant.invoke("callback", {"n": 21}).json() == {"doubled": 42}


def test_callback_error_is_the_invocations_error(tenant: Tenant) -> None:
    source = """
exports.handler = (event, context, callback) => callback(new TypeError("not a number"));
"""
    deploy_node(tenant, "callbackerr", {"app.js": source})

    response = tenant.invoke("callbackerr")

    assert response.headers["x-function-error"] == "Unhandled"
    assert response.json()["errorType"] == "TypeError"
    assert response.json()["errorMessage"] == "not a number"


@pytest.mark.parametrize(
    ("files", "handler"),
    [
        ({"app.mjs": "export const handler = async (e) => ({ kind: 'mjs', e });"}, "app.handler"),
        ({"app.cjs": "module.exports.handler = async (e) => ({ kind: 'cjs', e });"}, "app.handler"),
        (
            {
                "package.json": '{"type": "module"}',
                "app.js": "export async function handler(e) { return { kind: 'esm-js', e }; }",
            },
            "app.handler",
        ),
        (
            {"src/lib/app.js": "exports.go = async (e) => ({ kind: 'nested', e });"},
            "src/lib/app.go",
        ),
    ],
    ids=["mjs", "cjs", "type-module", "nested"],
)
def test_modules_of_every_kind_load(tenant: Tenant, files: dict[str, str], handler: str) -> None:
    deploy_node(tenant, "kinds", files, handler=handler)

    body = tenant.invoke("kinds", {"x": 1}).json()

    assert body["e"] == {"x": 1}
    assert body["kind"] in ("mjs", "cjs", "esm-js", "nested")


def test_thrown_error_has_a_stack_without_runtime_frames(tenant: Tenant) -> None:
    source = """
function helper() {
  throw new RangeError("bad input");
}
exports.handler = async () => helper();
"""
    deploy_node(tenant, "boom", {"app.js": source})

    response = tenant.invoke("boom")

    assert response.status_code == 200
    assert response.headers["x-function-error"] == "Unhandled"
    error = response.json()
    assert error["errorType"] == "RangeError"
    assert error["errorMessage"] == "bad input"
    trace = "\n".join(error["stackTrace"])
    assert "/var/task/app.js" in trace and "helper" in trace
    assert "/var/runtime" not in trace and "node:internal" not in trace
    record = tenant.invocation(response.headers["x-request-id"])
    assert record["status"] == "error" and record["error_type"] == "RangeError"
    assert "bad input" in record["logs"]


def test_error_does_not_discard_the_instance(tenant: Tenant) -> None:
    source = """
const INSTANCE = Math.random();
exports.handler = async (event) => {
  if (event.fail) throw new Error("asked to");
  return INSTANCE;
};
"""
    deploy_node(tenant, "flaky", {"app.js": source})

    instance = tenant.invoke("flaky").json()
    assert tenant.invoke("flaky", {"fail": True}).headers["x-function-error"] == "Unhandled"
    assert tenant.invoke("flaky").json() == instance


@pytest.mark.parametrize(
    ("files", "handler", "error_type", "message"),
    [
        ({"app.js": "require('not-a-real-module');"}, "app.handler", "Runtime.ImportModuleError",
         "not-a-real-module"),
        ({"app.js": "exports.other = async () => 1;"}, "app.handler", "Runtime.HandlerNotFound",
         "app.handler is undefined or not exported"),
        ({"app.js": "exports.handler = 42;"}, "app.handler", "Runtime.HandlerNotFound",
         "app.handler is not a function"),
        ({"app.js": "exports.handler = async () => {"}, "app.handler",
         "Runtime.UserCodeSyntaxError", "SyntaxError"),
        ({"app.mjs": "export const handler = async () => {"}, "app.handler",
         "Runtime.UserCodeSyntaxError", "SyntaxError"),
        ({"app.js": "throw new Error('config missing');"}, "app.handler", "Error",
         "config missing"),
    ],
    ids=["import", "missing", "not-a-function", "syntax", "syntax-esm", "throws"],
)  # fmt: skip
def test_init_failures_answer_lambdas_error_types(
    tenant: Tenant, files: dict[str, str], handler: str, error_type: str, message: str
) -> None:
    deploy_node(tenant, "broken", files, handler=handler)

    response = tenant.invoke("broken")

    assert response.headers["x-function-error"] == "Unhandled"
    error = response.json()
    assert error["errorType"] == error_type
    assert message in error["errorMessage"]
    assert tenant.invocation(response.headers["x-request-id"])["status"] == "error"


def test_unhandled_rejection_fails_the_invocation_and_replaces_the_instance(
    tenant: Tenant,
) -> None:
    source = """
const INSTANCE = Math.random();
exports.handler = async (event) => {
  if (event.reject) {
    Promise.reject(new Error("nobody listens"));
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  return INSTANCE;
};
"""
    deploy_node(tenant, "rejects", {"app.js": source})
    before = tenant.invoke("rejects").json()

    response = tenant.invoke("rejects", {"reject": True})

    assert response.headers["x-function-error"] == "Unhandled"
    assert response.json()["errorType"] == "Runtime.UnhandledPromiseRejection"
    assert "nobody listens" in response.json()["errorMessage"]
    assert tenant.invoke("rejects").json() != before


def test_unserialisable_result_answers_marshal_error(tenant: Tenant) -> None:
    deploy_node(tenant, "marshal", {"app.js": "exports.handler = async () => 10n;"})

    assert tenant.invoke("marshal").json()["errorType"] == "Runtime.MarshalError"


def test_timeout_answers_sandbox_timedout(tenant: Tenant) -> None:
    source = "exports.handler = () => new Promise(() => {});"
    deploy_node(tenant, "hangs", {"app.js": source}, timeout_s=1)

    response = tenant.invoke("hangs")

    assert response.json()["errorType"] == "Sandbox.Timedout"
    assert tenant.invocation(response.headers["x-request-id"])["status"] == "timeout"


def test_runtime_api_is_reachable_over_tcp_from_function_code(tenant: Tenant) -> None:
    source = """
const net = require("node:net");
exports.handler = async () => {
  const [host, port] = process.env.AWS_LAMBDA_RUNTIME_API.split(":");
  return await new Promise((resolve) => {
    const socket = net.connect(Number(port), host, () => {
      socket.write("GET /nope HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n");
    });
    let answer = "";
    socket.on("data", (chunk) => (answer += chunk));
    socket.on("end", () => resolve(answer.split("\\r\\n")[0]));
    socket.on("error", (error) => resolve(String(error)));
  });
};
"""
    deploy_node(tenant, "relay", {"app.js": source})

    assert tenant.invoke("relay").json() == "HTTP/1.1 404 Not Found"


def test_memory_limit_kill_answers_out_of_memory(tenant: Tenant) -> None:
    source = """
exports.handler = async () => {
  const blocks = [];
  for (;;) blocks.push(Buffer.alloc(16 * 1024 * 1024, 1));
};
"""
    deploy_node(tenant, "hog", {"app.js": source}, memory_mb=128, timeout_s=20)

    response = tenant.invoke("hog")

    assert response.json()["errorType"] == "Runtime.OutOfMemory"


def test_node_options_start_a_fresh_sandbox(tenant: Tenant) -> None:
    # Node.js reads NODE_OPTIONS as it starts, before a pooled runtime gets its function.
    source = "exports.handler = async () => process.execArgv.concat(process.env.NODE_OPTIONS);"
    deploy_node(
        tenant, "options", {"app.js": source}, environment={"NODE_OPTIONS": "--no-warnings"}
    )

    response = tenant.invoke("options")

    assert response.json() == ["--no-warnings"]
    assert tenant.invocation(response.headers["x-request-id"])["start_kind"] == "fresh"
