#!/usr/bin/env python3
"""Soak test: two cluster-mode replicas (real Redis and PostgreSQL) under a
steady, mixed load for a bounded time. Reports errors, resident memory over
time, and whether Redis, PostgreSQL's usage_buckets and the sum of
usage_events agree at the end. Exits non-zero on any error or mismatch.

    bash scripts/soak.sh                 # 10 minutes at 40 requests/s
    bash scripts/soak.sh --duration 60   # shorter

Only loopback addresses are used. Needs the release binaries (the wrapper
builds them), redis-cli and psql.
"""
import argparse, json, os, random, signal, socket, subprocess, sys, tempfile, threading, time, uuid
import urllib.request, urllib.error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATEWAY = os.path.join(ROOT, "target", "release", "llm-quota")
BENCH = os.path.join(ROOT, "target", "release", "llm-quota-bench")
PG = os.environ.get("LQ_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432")
REDIS = os.environ.get("LQ_TEST_REDIS", "redis://127.0.0.1:6379/")
ADMIN_PASSWORD = "soak-" + uuid.uuid4().hex


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, token=None, timeout=30, stream_first_only=False):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            payload = r.read(64) if stream_first_only else r.read()
            return r.status, payload
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None


def psql(db_url, sql):
    return subprocess.run(["psql", db_url, "-At", "-c", sql], check=True, capture_output=True, text=True).stdout.strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    ap.add_argument("--rate", type=float, default=40, help="requests per second (default 40)")
    ap.add_argument("--workers", type=int, default=16)
    args = ap.parse_args()

    scratch = tempfile.mkdtemp(prefix="llm-quota-soak-")
    db_name = "lq_soak_" + uuid.uuid4().hex[:12]
    prefix = "lqsoak-" + uuid.uuid4().hex[:8]
    db_url = f"{PG}/{db_name}"
    psql(f"{PG}/postgres", f"CREATE DATABASE {db_name}")
    procs = []
    try:
        mock = subprocess.Popen([BENCH, "mock", str(free_port())], stdout=subprocess.PIPE, text=True)
        procs.append(mock)
        mock_port = int(mock.stdout.readline().split()[1])
        env = dict(os.environ, DATABASE_URL=db_url, REDIS_URL=REDIS, REDIS_PREFIX=prefix, ADMIN_PASSWORD=ADMIN_PASSWORD,
                   OLLAMA_URL=f"http://127.0.0.1:{mock_port}", PROXY_HOST="127.0.0.1", LOG_FORMAT="json", RUST_LOG="warn",
                   LOG_FILE="off", FLUSH_INTERVAL="2s", LEASE_TOKENS="16")
        subprocess.run([GATEWAY, "migrate"], env=env, check=True, capture_output=True)
        replicas = []
        for i in range(2):
            ports = dict(PROXY_PORT=free_port(), ADMIN_PORT=free_port(), METRICS_PORT=free_port())
            log = open(os.path.join(scratch, f"replica{i}.log"), "w")
            p = subprocess.Popen([GATEWAY], env=dict(env, **{k: str(v) for k, v in ports.items()}), stdout=log, stderr=log)
            procs.append(p)
            replicas.append(dict(proc=p, proxy=f"http://127.0.0.1:{ports['PROXY_PORT']}", admin=f"http://127.0.0.1:{ports['ADMIN_PORT']}"))
        for r in replicas:
            for _ in range(100):
                try:
                    if http("GET", r["proxy"] + "/readyz")[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.1)
            else:
                raise SystemExit("a replica did not become ready; see " + scratch)

        keys = []
        for name, limits in [("unlimited", {}), ("tight-tokens", {"daily_token_limit": 20000}),
                             ("tight-requests", {"daily_request_limit": 500}), ("monthly", {"monthly_token_limit": 200000})]:
            status, body = http("POST", replicas[0]["admin"] + "/api/api-keys", dict(name=name, **limits), ADMIN_PASSWORD)
            assert status == 200, body
            v = json.loads(body)
            keys.append((v["id"], v["key"]))

        counts, errors, lock = {}, [], threading.Lock()
        stop = time.time() + args.duration
        interval = args.workers / args.rate

        def worker(seed):
            rnd = random.Random(seed)
            nxt = time.time()
            while time.time() < stop:
                nxt += interval
                _, key = rnd.choice(keys)
                base = rnd.choice(replicas)["proxy"]
                model = f"bench-d{rnd.choice([0, 5, 20])}-n{rnd.choice([8, 32, 64])}-g{rnd.choice([0, 2])}"
                stream = rnd.random() < 0.5
                kind = rnd.randrange(3)
                if kind == 0:
                    path, body = "/v1/chat/completions", {"model": model, "stream": stream, "messages": [{"role": "user", "content": "soak " * rnd.randint(1, 60)}]}
                elif kind == 1:
                    path, body = "/api/chat", {"model": model, "stream": stream, "messages": [{"role": "user", "content": "soak " * rnd.randint(1, 60)}]}
                else:
                    path, body = "/api/generate", {"model": model, "stream": stream, "prompt": "soak " * rnd.randint(1, 60)}
                try:
                    status, _ = http("POST", base + path, body, key, stream_first_only=stream and rnd.random() < 0.2)
                except Exception as e:  # noqa: BLE001 - every failure is reported
                    status = f"exception {type(e).__name__}"
                with lock:
                    counts[status] = counts.get(status, 0) + 1
                    if status not in (200, 429):
                        errors.append((path, status))
                time.sleep(max(0, nxt - time.time()))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.workers)]
        for t in threads:
            t.start()
        print(f"soak: {args.duration:.0f}s at {args.rate}/s through 2 replicas (scratch {scratch})")
        print("| t (s) | requests | errors | RSS replica 1 (MB) | RSS replica 2 (MB) |")
        print("|---|---|---|---|---|")
        started = time.time()
        samples = []
        while any(t.is_alive() for t in threads):
            time.sleep(min(30, max(1, args.duration / 20)))
            rss = [rss_kb(r["proc"].pid) for r in replicas]
            samples.append(rss)
            with lock:
                n, e = sum(counts.values()), len(errors)
            print(f"| {time.time() - started:.0f} | {n} | {e} | {rss[0] / 1024:.1f} | {rss[1] / 1024:.1f} |", flush=True)
        for t in threads:
            t.join()

        # graceful stop: in-flight requests finish, final flush
        for r in replicas:
            r["proc"].send_signal(signal.SIGTERM)
        for r in replicas:
            r["proc"].wait(timeout=60)

        mismatches = []
        day = psql(db_url, "SELECT bucket FROM usage_buckets WHERE period = 'day' ORDER BY bucket DESC LIMIT 1")
        for key_id, _ in keys:
            raw = subprocess.run(["redis-cli", "-u", REDIS, "HMGET", f"{prefix}:{{{key_id}}}:d:{day}", "req", "ref", "pt", "ct", "rsv"],
                                 capture_output=True, text=True, check=True).stdout.split()
            req, ref, pt, ct, rsv = (int(x) if x.lstrip("-").isdigit() else 0 for x in (raw + ["0"] * 5)[:5])
            pg = psql(db_url, f"SELECT requests - refunds, prompt_tokens + completion_tokens FROM usage_buckets WHERE key_id = {key_id} AND period = 'day' AND bucket = '{day}'")
            pg_req, pg_tok = (int(x) for x in (pg.split("|") if pg else ["0", "0"]))
            ev = psql(db_url, f"SELECT COUNT(*), COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM usage_events WHERE key_id = {key_id} AND day = '{day}' AND refunded = 0 AND outcome <> 'rejected'")
            ev_req, ev_tok = (int(x) for x in ev.split("|"))
            line = f"key {key_id}: redis {req - ref} req / {pt + ct} tok (reserved {rsv}); postgres {pg_req} / {pg_tok}; events {ev_req} / {ev_tok}"
            print(line)
            if not (req - ref == pg_req == ev_req and pt + ct == pg_tok == ev_tok and rsv == 0):
                mismatches.append(line)

        print(f"statuses: {json.dumps({str(k): v for k, v in sorted(counts.items(), key=lambda kv: str(kv[0]))})}")
        peak = [max(s[i] or 0 for s in samples) / 1024 for i in range(2)] if samples else [0, 0]
        print(f"RSS first/last/peak (MB): replica 1 {samples[0][0] / 1024:.1f}/{samples[-1][0] / 1024:.1f}/{peak[0]:.1f}, "
              f"replica 2 {samples[0][1] / 1024:.1f}/{samples[-1][1] / 1024:.1f}/{peak[1]:.1f}")
        ok = not errors and not mismatches
        print(f"errors: {len(errors)} {errors[:5]}; stores agree: {not mismatches}")
        print(f"{1 if ok else 0} passed, {0 if ok else 1} failed")
        return 0 if ok else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        subprocess.run(["psql", f"{PG}/postgres", "-c", f"DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"], capture_output=True)
        keys_out = subprocess.run(["redis-cli", "-u", REDIS, "--scan", "--pattern", f"{prefix}:*"], capture_output=True, text=True).stdout.split()
        if keys_out:
            subprocess.run(["redis-cli", "-u", REDIS, "DEL", *keys_out], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
