// The gateway's dashboard: replicas, recent payments, a receipt checker.
// Plain DOM, no build step. Everything shown is set with textContent (never innerHTML):
// payment metadata, account names and problem details come from outside.
"use strict";

const KEY_ITEM = "pbft-gateway-api-key"; // sessionStorage: gone when the tab closes
const REFRESH_MS = 2000;
const PAYMENTS_SHOWN = 20;

let refreshTimer = null;

function $(id) {
  return document.getElementById(id);
}

function apiKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = { Authorization: "Bearer " + apiKey(), Accept: "application/json" };
  if (options.body !== undefined) {
    headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
    cache: "no-store",
  });
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = null;
  }
  if (!response.ok) {
    // An RFC 9457 problem names what is wrong in `detail` (or at least `title`).
    const detail = body && (body.detail || body.title);
    throw new ApiError(response.status, detail || "HTTP " + response.status);
  }
  return body;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "—" : String(text);
  if (className) {
    td.className = className;
  }
  row.appendChild(td);
  return td;
}

function yesNo(row, value, name) {
  const td = cell(row, value ? "yes" : "no", name + " " + (value ? "yes" : "no"));
  return td;
}

// 401: no such key (or revoked); 403: a key for a client this gateway does not serve.
function keyRefused(error) {
  return error instanceof ApiError && (error.status === 401 || error.status === 403);
}

function showError(message) {
  const error = $("error");
  error.textContent = message;
  error.hidden = !message;
}

// --- signing in and out -------------------------------------------------------------------

function showSignedIn(signedIn) {
  $("dashboard").hidden = !signedIn;
  $("key-section").hidden = signedIn;
  $("key-forget").hidden = !signedIn;
  if (!signedIn) {
    $("cluster-summary").textContent = "not signed in";
  }
}

function signOut(reason) {
  sessionStorage.removeItem(KEY_ITEM);
  if (refreshTimer !== null) {
    clearTimeout(refreshTimer);
    refreshTimer = null;
  }
  $("key-status").textContent = reason || "";
  showSignedIn(false);
}

function signIn(key) {
  sessionStorage.setItem(KEY_ITEM, key);
  $("key-status").textContent = "";
  showSignedIn(true);
  refresh();
}

// --- the replicas -------------------------------------------------------------------------

function renderCluster(cluster) {
  const embedded =
    cluster.embedded_replica === null ? "" : ", hosts replica " + cluster.embedded_replica;
  $("cluster-summary").textContent =
    "cluster " + cluster.cluster + ": n = " + cluster.n + ", f = " + cluster.f + embedded;
  const rows = cluster.replicas.map((replica) => {
    const row = document.createElement("tr");
    row.dataset.replica = String(replica.id);
    if (!replica.answered) {
      row.className = "silent";
    }
    cell(row, replica.id, "id");
    cell(row, replica.address, "address");
    yesNo(row, replica.connected, "connected");
    yesNo(row, replica.answered, "answered");
    cell(row, replica.view, "view");
    cell(row, replica.view_status, "view-status");
    cell(row, replica.last_executed, "last-executed");
    cell(row, replica.stable_checkpoint, "stable-checkpoint");
    return row;
  });
  $("replicas").tBodies[0].replaceChildren(...rows);
}

// --- recent payments ----------------------------------------------------------------------

// The gateway refuses amounts past Number.MAX_SAFE_INTEGER (2**53 - 1); a number past it
// (a payment made outside the gateway) was rounded by JSON.parse already: say so.
function amountText(value) {
  return typeof value === "number" && !Number.isSafeInteger(value) ? "unsafe (> 2^53 - 1)" : value;
}

function renderPayments(list) {
  const rows = list.data.map((payment) => {
    const row = document.createElement("tr");
    row.dataset.payment = payment.id;
    cell(row, payment.id, "id");
    cell(row, payment.status, "status");
    cell(row, payment.reason, "reason");
    cell(row, payment.from, "from");
    cell(row, payment.to, "to");
    cell(row, amountText(payment.amount), "amount");
    cell(row, payment.seq, "seq");
    const receiptCell = cell(row, payment.receipt ? "" : null, "receipt");
    if (payment.receipt) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "Check";
      button.addEventListener("click", () => {
        $("receipt-input").value = payment.receipt.data;
        checkReceipt();
      });
      receiptCell.appendChild(button);
    }
    return row;
  });
  $("payments").tBodies[0].replaceChildren(...rows);
  $("payments-empty").hidden = rows.length > 0;
}

// --- polling ------------------------------------------------------------------------------

async function refresh() {
  refreshTimer = null;
  if (!apiKey()) {
    return;
  }
  try {
    const [cluster, payments] = await Promise.all([
      api("/v1/cluster"),
      api("/v1/payments?limit=" + PAYMENTS_SHOWN),
    ]);
    renderCluster(cluster);
    renderPayments(payments);
    $("updated").textContent = new Date().toLocaleTimeString();
    showError("");
  } catch (error) {
    if (keyRefused(error)) {
      signOut("The gateway refused this API key: " + error.message);
      return;
    }
    showError("Could not refresh: " + error.message);
  }
  if (apiKey()) {
    refreshTimer = setTimeout(refresh, REFRESH_MS);
  }
}

// --- the receipt checker ------------------------------------------------------------------

function field(list, name, value) {
  const term = document.createElement("dt");
  term.textContent = name;
  const description = document.createElement("dd");
  description.textContent =
    value !== null && typeof value === "object" ? JSON.stringify(value) : String(value);
  list.append(term, description);
}

async function checkReceipt() {
  const verdict = $("receipt-verdict");
  const receipt = $("receipt-input").value.trim();
  $("receipt-result").hidden = false;
  $("receipt-fields").replaceChildren();
  verdict.className = "";
  delete verdict.dataset.verdict;
  if (!receipt) {
    verdict.textContent = "paste a receipt first";
    $("receipt-detail").textContent = "";
    return;
  }
  verdict.textContent = "checking…";
  $("receipt-detail").textContent = "";
  try {
    const result = await api("/v1/receipts/verify", { method: "POST", body: { receipt } });
    verdict.textContent = result.verdict;
    verdict.className = result.verdict;
    verdict.dataset.verdict = result.verdict;
    $("receipt-detail").textContent = result.detail || "";
    const list = $("receipt-fields");
    for (const [name, value] of Object.entries(result)) {
      if (!["object", "valid", "verdict", "detail"].includes(name) && value !== null) {
        field(list, name, value);
      }
    }
  } catch (error) {
    if (keyRefused(error)) {
      signOut("The gateway refused this API key: " + error.message);
      return;
    }
    verdict.textContent = "not checked";
    verdict.dataset.verdict = "error";
    $("receipt-detail").textContent = error.message;
  }
}

// --- wiring -------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    $("api-key").value = "";
    if (!key) {
      $("key-status").textContent = "Enter an API key.";
      return;
    }
    signIn(key);
  });
  $("key-forget").addEventListener("click", () => signOut("API key forgotten."));
  $("receipt-form").addEventListener("submit", (event) => {
    event.preventDefault();
    checkReceipt();
  });
  if (apiKey()) {
    signIn(apiKey());
  } else {
    showSignedIn(false);
  }
});
