// Lambent's built-in nodejs20.x runtime.
//
// The sandbox runs it as `node /var/runtime/nodejs/bootstrap.mjs` with the function's code in
// /var/task as the working directory. It uses Node.js's own modules only.
//
// It loads the handler named by _HANDLER ("file.function": src/app.handler calls the `handler`
// export of /var/task/src/app.js, .mjs or .cjs), reports a failure to load on /init/error, then
// loops: take an event from /next, call the handler, post its result to /response or its error
// to /error. Handlers are `async (event, context)`, return a promise, or take a third
// `callback(error, result)` argument, as on Lambda. It speaks the Runtime API on the Unix socket
// mounted into the sandbox, and relays AWS_LAMBDA_RUNTIME_API (TCP, on the sandbox's loopback)
// to the same socket for user code and SDKs.
//
// Two deliberate differences from Lambda's runtime: the response is sent as soon as the handler's
// promise settles or its callback is called, without waiting for the event loop to empty (as if
// context.callbackWaitsForEmptyEventLoop were false); and a handler that returns a plain value
// (not a promise) and takes no callback answers with that value, where Lambda would wait for the
// event loop and answer null.
//
// Started with LAMBENT_PRESTARTED set, it belongs to no function yet: /var/task is empty and the
// environment generic. It waits on Lambent's assignment endpoint for its function's environment,
// takes it as its own, and then loads the handler exactly as above.

import fs from "node:fs";
import http from "node:http";
import { createRequire } from "node:module";
import net from "node:net";
import path from "node:path";
import { pathToFileURL } from "node:url";
import util from "node:util";

const DEFAULT_SOCKET = "/var/runtime/api/runtime.sock";
const API = "/2018-06-01/runtime";
const ASSIGNMENT = "/2018-06-01/lambent/assignment";
const RUNTIME_DIR = path.dirname(path.dirname(new URL(import.meta.url).pathname));
// Exit status when the runtime gives up after an error it cannot report (Lambda's runtime uses it).
const FATAL_EXIT = 128;

const socketPath = process.env.LAMBENT_RUNTIME_SOCKET || DEFAULT_SOCKET;
// One connection, kept alive, as the Python runtime does.
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });

class RuntimeApiError extends Error {}

function request(method, urlPath, body, headers = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { socketPath, method, path: urlPath, agent, headers: { ...headers } },
      (res) => {
        const chunks = [];
        res.on("data", (chunk) => chunks.push(chunk));
        res.on("end", () =>
          resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }),
        );
        res.on("error", reject);
      },
    );
    req.on("error", reject);
    if (body !== undefined) {
      req.setHeader("Content-Type", "application/json");
      req.setHeader("Content-Length", body.length);
      req.end(body);
    } else {
      req.end();
    }
  });
}

// A TCP relay on the sandbox's loopback to the Runtime API socket, for code that uses
// AWS_LAMBDA_RUNTIME_API. Bound before the function is loaded, so its module code may use it.
function startRelay() {
  const address = process.env.AWS_LAMBDA_RUNTIME_API;
  if (!address) return Promise.resolve();
  const colon = address.lastIndexOf(":");
  const host = address.slice(0, colon).replace(/^\[|\]$/g, "") || "127.0.0.1";
  const port = Number(address.slice(colon + 1));
  // Half-open: a client that has sent its whole request may still be owed the answer.
  const server = net.createServer({ allowHalfOpen: true }, (client) => {
    client.setNoDelay(true);
    const upstream = net.connect({ path: socketPath, allowHalfOpen: true });
    client.pipe(upstream);
    upstream.pipe(client);
    const close = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on("error", close);
    upstream.on("error", close);
  });
  return new Promise((resolve) => {
    server.once("error", (error) => {
      // This runtime does not need the relay itself; only code calling the API over TCP does.
      process.stderr.write(`[WARNING] Runtime API relay not started on ${address}: ${error}\n`);
      resolve();
    });
    server.listen(port, host, resolve);
  });
}

// Lambda's text log format: every console line carries the time, the request id and the level.
let currentRequestId = "undefined";

function installConsole() {
  const levels = { log: "INFO", info: "INFO", warn: "WARN", error: "ERROR", debug: "DEBUG" };
  for (const [method, level] of Object.entries(levels)) {
    console[method] = (...args) => {
      const line = `${new Date().toISOString()}\t${currentRequestId}\t${level}\t${util.format(...args)}\n`;
      process.stdout.write(line);
    };
  }
  console.trace = (...args) => {
    const trace = new Error(util.format(...args)).stack.replace(/^Error/, "Trace");
    process.stdout.write(`${new Date().toISOString()}\t${currentRequestId}\tTRACE\t${trace}\n`);
  };
}

function userFrames(stack) {
  return String(stack || "")
    .split("\n")
    .filter((line) => !line.includes(RUNTIME_DIR + "/") && !line.includes("node:internal"));
}

function errorPayload(error, errorType) {
  if (error instanceof Error) {
    return {
      errorType: errorType || error.name || error.constructor?.name || "Error",
      errorMessage: error.message,
      stackTrace: userFrames(error.stack),
    };
  }
  return { errorType: errorType || typeof error, errorMessage: String(error), stackTrace: [] };
}

class FunctionError extends Error {
  constructor(errorType, message, stackTrace = []) {
    super(message);
    this.payload = { errorType, errorMessage: message, stackTrace };
  }
}

function logError(payload) {
  process.stderr.write(
    `${new Date().toISOString()}\t${currentRequestId}\tERROR\t${payload.errorType}: ` +
      `${payload.errorMessage}\n${payload.stackTrace.slice(1).join("\n")}\n`,
  );
}

async function postError(urlPath, payload) {
  logError(payload);
  const body = Buffer.from(JSON.stringify(payload));
  await request("POST", urlPath, body, { "Lambda-Runtime-Function-Error-Type": payload.errorType });
}

async function adoptAssignment() {
  const response = await request("GET", ASSIGNMENT);
  if (response.status !== 200) {
    throw new RuntimeApiError(`/assignment answered ${response.status}: ${response.body}`);
  }
  // Updated rather than replaced, as the Python runtime does.
  Object.assign(process.env, JSON.parse(response.body).environment);
  delete process.env.LAMBENT_PRESTARTED;
}

async function loadModule(taskRoot, moduleName) {
  const base = path.resolve(taskRoot, moduleName);
  const require = createRequire(path.join(taskRoot, "index.js"));
  for (const extension of [".js", ".mjs", ".cjs"]) {
    const file = base + extension;
    if (!fs.existsSync(file)) continue;
    if (extension === ".mjs") return import(pathToFileURL(file).href);
    try {
      return require(file);
    } catch (error) {
      // A .js file of a package with "type": "module" is an ES module.
      if (error?.code === "ERR_REQUIRE_ESM") return import(pathToFileURL(file).href);
      throw error;
    }
  }
  const error = new Error(`Cannot find module '${moduleName}'`);
  error.code = "MODULE_NOT_FOUND";
  throw error;
}

async function loadHandler(handlerName, taskRoot) {
  const slash = handlerName.lastIndexOf("/");
  const folder = handlerName.slice(0, slash + 1);
  const base = handlerName.slice(slash + 1);
  const dot = base.indexOf(".");
  if (dot <= 0 || dot === base.length - 1) {
    throw new FunctionError(
      "Runtime.MalformedHandlerName",
      `Bad handler '${handlerName}': expected the form <file>.<function>`,
    );
  }
  const moduleName = folder + base.slice(0, dot);
  const path_ = base.slice(dot + 1);

  let module;
  try {
    module = await loadModule(taskRoot, moduleName);
  } catch (error) {
    if (error instanceof SyntaxError) {
      throw new FunctionError(
        "Runtime.UserCodeSyntaxError",
        `SyntaxError: ${error.message}`,
        userFrames(error.stack),
      );
    }
    if (error?.code === "MODULE_NOT_FOUND" || error?.code === "ERR_MODULE_NOT_FOUND") {
      throw new FunctionError(
        "Runtime.ImportModuleError",
        `Error: ${error.message.split("\n")[0]}`,
        userFrames(error.stack),
      );
    }
    const payload = errorPayload(error);
    throw new FunctionError(payload.errorType, payload.errorMessage, payload.stackTrace);
  }

  let handler = module;
  for (const part of path_.split(".")) {
    handler = handler?.[part];
  }
  // An ES module imported from CommonJS code has its exports under `default` too.
  if (handler === undefined && module?.default !== undefined) {
    handler = path_.split(".").reduce((value, part) => value?.[part], module.default);
  }
  if (handler === undefined) {
    throw new FunctionError(
      "Runtime.HandlerNotFound",
      `${moduleName}.${path_} is undefined or not exported`,
    );
  }
  if (typeof handler !== "function") {
    throw new FunctionError("Runtime.HandlerNotFound", `${moduleName}.${path_} is not a function`);
  }
  return handler;
}

function functionFromEnv() {
  // Read once, before user code runs and can change process.env.
  const env = process.env;
  return {
    functionName: env.AWS_LAMBDA_FUNCTION_NAME,
    functionVersion: env.AWS_LAMBDA_FUNCTION_VERSION,
    memoryLimitInMB: env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE,
    logGroupName: env.AWS_LAMBDA_LOG_GROUP_NAME,
    logStreamName: env.AWS_LAMBDA_LOG_STREAM_NAME,
  };
}

function parseJsonHeader(value) {
  if (!value) return undefined;
  try {
    return JSON.parse(value);
  } catch {
    return undefined;
  }
}

function runHandler(handler, event, context) {
  return new Promise((resolve, reject) => {
    let settled = false;
    const settle = (error, value) => {
      if (settled) return;
      settled = true;
      if (error !== undefined && error !== null) reject(error);
      else resolve(value);
    };
    const callback = (error, value) => settle(error, value);
    context.succeed = (value) => settle(null, value);
    context.fail = (error) => settle(error ?? new Error("handled"));
    context.done = (error, value) => settle(error, value);

    let returned;
    try {
      returned = handler(event, context, callback);
    } catch (error) {
      settle(error);
      return;
    }
    if (returned && typeof returned.then === "function") {
      returned.then((value) => settle(null, value), (error) => settle(error ?? new Error("rejected")));
    } else if (handler.length < 3) {
      settle(null, returned);
    }
  });
}

// What an error outside the handler's own promise is reported against.
const inFlight = { requestId: null, initializing: true };

async function fatal(error, errorType) {
  const payload = errorPayload(error, errorType);
  try {
    if (inFlight.initializing) {
      await postError(`${API}/init/error`, payload);
    } else if (inFlight.requestId) {
      await postError(`${API}/invocation/${inFlight.requestId}/error`, payload);
    } else {
      logError(payload);
    }
  } finally {
    process.exit(FATAL_EXIT);
  }
}

async function invoke(handler, fn) {
  const next = await request("GET", `${API}/invocation/next`);
  if (next.status !== 200) {
    throw new RuntimeApiError(`/next answered ${next.status}: ${next.body.toString().slice(0, 200)}`);
  }
  const headers = next.headers;
  const requestId = headers["lambda-runtime-aws-request-id"] || "";
  const deadlineMs = Number(headers["lambda-runtime-deadline-ms"] || 0);
  currentRequestId = requestId;
  inFlight.requestId = requestId;
  if (headers["lambda-runtime-trace-id"]) {
    process.env._X_AMZN_TRACE_ID = headers["lambda-runtime-trace-id"];
  } else {
    delete process.env._X_AMZN_TRACE_ID;
  }

  const context = {
    ...fn,
    awsRequestId: requestId,
    invokedFunctionArn: headers["lambda-runtime-invoked-function-arn"],
    identity: parseJsonHeader(headers["lambda-runtime-cognito-identity"]),
    clientContext: parseJsonHeader(headers["lambda-runtime-client-context"]),
    callbackWaitsForEmptyEventLoop: true,
    getRemainingTimeInMillis: () => Math.max(deadlineMs - Date.now(), 0),
  };

  let event;
  try {
    event = JSON.parse(next.body.toString() || "null");
  } catch {
    event = next.body.toString();
  }

  let payload;
  try {
    const result = await runHandler(handler, event, context);
    try {
      payload = Buffer.from(JSON.stringify(result === undefined ? null : result));
    } catch (error) {
      await postError(`${API}/invocation/${requestId}/error`, {
        errorType: "Runtime.MarshalError",
        errorMessage: `Unable to marshal response: ${error.message}`,
        stackTrace: [],
      });
      return;
    }
  } catch (error) {
    await postError(`${API}/invocation/${requestId}/error`, errorPayload(error));
    return;
  } finally {
    inFlight.requestId = null;
  }
  await request("POST", `${API}/invocation/${requestId}/response`, payload);
}

async function main() {
  process.on("uncaughtException", (error) => fatal(error));
  process.on("unhandledRejection", (reason) => {
    const error = reason instanceof Error ? reason : new Error(String(reason));
    fatal(error, "Runtime.UnhandledPromiseRejection");
  });

  try {
    await startRelay();
    installConsole();
    if (process.env.LAMBENT_PRESTARTED) await adoptAssignment();
    const taskRoot = process.env.LAMBDA_TASK_ROOT || "/var/task";
    const fn = functionFromEnv();

    let handler;
    try {
      handler = await loadHandler(process.env._HANDLER || "", taskRoot);
    } catch (error) {
      const payload =
        error instanceof FunctionError ? error.payload : errorPayload(error);
      await postError(`${API}/init/error`, payload);
      process.exit(1);
    }
    inFlight.initializing = false;

    for (;;) {
      await invoke(handler, fn);
    }
  } catch (error) {
    // The worker closes the API when it tears the sandbox down; there is nobody to report to.
    process.stderr.write(`[ERROR] Runtime API unavailable: ${error.message || error}\n`);
    process.exit(1);
  }
}

main();
