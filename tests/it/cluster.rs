//! Cluster mode: replicas on the real Redis and PostgreSQL. Three replicas
//! under 64 clients, admin changes across replicas, seeding after Redis
//! loses data, Redis and PostgreSQL outages, and migrations.

use std::time::Duration;

use llm_quota::quota::{BucketRef, QuotaStore};
use serde_json::{json, Value};

use crate::common::{chat, eventually, Cluster, Options, TcpProxy, TestApp};

const MODEL: &str = "llama3.2:latest";

async fn replicas(cluster: &Cluster, n: usize) -> Vec<TestApp> {
    let first = TestApp::spawn_with(cluster.options().env("LEASE_TOKENS", "8")).await;
    let mut all = vec![];
    let url = first.mock.url.clone();
    all.push(first);
    for _ in 1..n {
        // one upstream for all, migrations only by the first
        let opts = cluster.options().env("MIGRATE_ON_START", "false").env("OLLAMA_URL", &url).env("LEASE_TOKENS", "8");
        all.push(TestApp::spawn_with(opts).await);
    }
    all
}

/// A replica whose Redis connection runs through a `TcpProxy`, to cut it
/// or slow it down; `opts` adds to the replica's options.
async fn behind_redis_proxy(cluster: &Cluster, opts: impl FnOnce(Options) -> Options) -> (TcpProxy, TestApp) {
    let redis = TcpProxy::start(cluster.redis_url.trim_start_matches("redis://").trim_end_matches('/')).await;
    let app = TestApp::spawn_with(opts(cluster.options().env("REDIS_URL", &format!("redis://{}/", redis.addr)))).await;
    (redis, app)
}

async fn settle_all(apps: &[&TestApp]) {
    for a in apps {
        a.settled().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_enforce_one_key_exactly_and_the_stores_agree() {
    let cluster = Cluster::new().await;
    let apps = replicas(&cluster, 3).await;
    apps[0].mock.state.set_reply_tokens(40);
    let (id, key) = apps[0].create_key(json!({"name": "shared", "daily_token_limit": 3000, "daily_request_limit": 90})).await;
    let admitted = crate::common::mixed_clients(apps.iter().map(|a| a.proxy.clone()).collect(), &key, 64, 3).await;
    settle_all(&apps.iter().collect::<Vec<_>>()).await;
    for a in apps.iter() {
        a.state.flush().await.expect("flush");
    }
    let periods = apps[0].state.quota.periods();
    let (redis_day, _) = apps[0].state.quota.store.usage(id, &periods.day, &periods.month).await.unwrap();
    let redis_day = redis_day.unwrap();
    assert!(redis_day.net_requests() <= 90, "requests {} > 90", redis_day.net_requests());
    assert!(redis_day.tokens() <= 3000, "tokens {} > 3000", redis_day.tokens());
    assert_eq!(redis_day.net_requests(), admitted);
    assert_eq!(redis_day.reserved, 0);
    assert!(
        redis_day.net_requests() == 90 || redis_day.tokens() > 2500,
        "the key was driven to one of its limits ({} requests, {} tokens)",
        redis_day.net_requests(),
        redis_day.tokens()
    );

    let db = cluster.db().await;
    let pg_day = db.load_bucket(&BucketRef { key_id: id, period: "day", bucket: periods.day.clone() }).await.unwrap();
    assert_eq!(pg_day, redis_day, "PostgreSQL holds what Redis holds after a flush");
    let (events, p, c) = db.event_totals(id).await.unwrap();
    assert_eq!((events, p + c), (redis_day.net_requests(), redis_day.tokens()), "usage_events add up to the buckets");
}

#[tokio::test]
async fn the_next_request_finds_the_last_one_settled_in_redis() {
    let cluster = Cluster::new().await;
    let app = TestApp::spawn_with(cluster.options()).await;
    crate::quota::the_next_request_finds_the_last_one_settled(&app).await;
}

#[tokio::test]
async fn usage_events_insert_in_statements_on_postgres() {
    let cluster = Cluster::new().await;
    let db = cluster.db().await;
    db.migrate().await.unwrap();
    crate::proxy::events_insert_in_statements_and_skip_repeats(&db).await;
}

#[tokio::test]
async fn admin_changes_reach_every_replica_within_a_second() {
    let cluster = Cluster::new().await;
    let apps = replicas(&cluster, 2).await;
    let (id, key) = apps[0].key("k").await;
    assert_eq!(apps[1].get("/api/tags", &key).send().await.unwrap().status(), 200); // cached on replica 1
    apps[0].admin_json(reqwest::Method::PUT, &format!("/api/api-keys/{id}/deactivate"), None).await;
    // Pub/sub evicts within milliseconds.
    let other = &apps[1];
    eventually("replica 1 to refuse the deactivated key", || async {
        let s = other.get("/api/tags", &key).send().await.unwrap().status();
        if s == 403 { Ok(()) } else { Err(s) }
    })
    .await;
    apps[0].admin_json(reqwest::Method::PUT, "/api/settings", Some(json!({"default_model": "qwen3:8b"}))).await;
    eventually("the settings to reach replica 1", || async {
        let model = other.state.settings.get().default_model.clone();
        if model == "qwen3:8b" { Ok(()) } else { Err(model) }
    })
    .await;
    // the admin API of either replica shows the same keys: no replica-local state
    let (_, a) = apps[0].admin_json(reqwest::Method::GET, "/api/api-keys", None).await;
    let (_, b) = apps[1].admin_json(reqwest::Method::GET, "/api/api-keys", None).await;
    assert_eq!(a, b);
}

#[tokio::test]
async fn a_bucket_lost_in_redis_is_seeded_from_postgres() {
    let cluster = Cluster::new().await;
    let app = TestApp::spawn_with(cluster.options()).await;
    let (_, key) = app.create_key(json!({"name": "k", "daily_request_limit": 3})).await;
    let send = || async { app.post("/api/generate", &key, json!({"model": MODEL, "prompt": "x", "stream": false})).send().await.unwrap().status().as_u16() };
    assert_eq!(send().await, 200);
    assert_eq!(send().await, 200);
    app.state.flush().await.unwrap();
    // Redis forgets everything of this test
    let client = redis::Client::open(cluster.redis_url.clone()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}:*", cluster.prefix)).query_async(&mut c).await.unwrap();
    assert!(!keys.is_empty());
    let _: i64 = redis::cmd("DEL").arg(&keys).query_async(&mut c).await.unwrap();
    assert_eq!(send().await, 200, "the third request of three fits");
    assert_eq!(send().await, 429, "the two before the wipe were remembered");
}

/// A replica sends a request to the upstream while its admission is on
/// the way only when its last admission of the key left room for it. If
/// the key ran out on another replica meanwhile, the admission still
/// decides: 429, the upstream request is cancelled, nothing is charged.
#[tokio::test]
async fn a_request_sent_ahead_of_its_admission_is_cancelled_when_refused() {
    let cluster = Cluster::new().await;
    let (slow, a) = behind_redis_proxy(&cluster, |o| o).await;
    let b = TestApp::spawn_with(cluster.options().env("MIGRATE_ON_START", "false").env("OLLAMA_URL", &a.mock.url)).await;
    let mock = &a.mock.state;
    let body = json!({"model": MODEL, "stream": false, "messages": [{"role": "user", "content": "hi"}]});
    let send = |app: &TestApp, key: &str| app.post("/api/chat", key, body.clone()).send();
    let (id, key) = a.create_key(json!({"name": "k", "daily_request_limit": 3})).await;

    assert_eq!(send(&a, &key).await.unwrap().status(), 200, "replica A: 2 requests left");
    assert_eq!(send(&b, &key).await.unwrap().status(), 200);
    assert_eq!(send(&b, &key).await.unwrap().status(), 200, "replica B took the last request");
    settle_all(&[&a, &b]).await;
    assert_eq!(mock.requests(), 3);
    let periods = a.state.quota.periods();
    let (before, _) = a.state.quota.store.usage(id, &periods.day, &periods.month).await.unwrap();

    // Redis answers replica A slowly, and the upstream's stream takes long:
    // the request reaches the upstream before the refusal reaches A.
    slow.set_delay(Duration::from_millis(150));
    mock.set_chunk_delay(Duration::from_millis(200));
    let resp = send(&a, &key).await.unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.json::<Value>().await.unwrap()["error"].as_str().unwrap().starts_with("daily request limit of 3 reached"));
    // (It was written before the refusal came back; the mock counts it once
    // it has read it.)
    mock.wait_until("the request replica A sent ahead of its admission", |m| m.requests() == 4).await;
    mock.wait_for_cancelled(1).await;
    settle_all(&[&a, &b]).await;
    let (after, _) = a.state.quota.store.usage(id, &periods.day, &periods.month).await.unwrap();
    assert_eq!(after, before, "the refused request charged nothing");

    mock.set_chunk_delay(Duration::ZERO);
    // After a refusal the key is admitted first again.
    assert_eq!(send(&a, &key).await.unwrap().status(), 429);
    assert_eq!(mock.requests(), 4, "a refused key is admitted before the upstream sees a request");

    // So is a key the replica has not admitted before.
    let (_, other) = a.create_key(json!({"name": "other", "daily_request_limit": 1})).await;
    assert_eq!(send(&b, &other).await.unwrap().status(), 200);
    assert_eq!(send(&a, &other).await.unwrap().status(), 429);
    assert_eq!(mock.requests(), 5, "a key new to the replica is admitted before the upstream sees a request");
    mock.wait_for_completed(4).await;
    assert_eq!(mock.cancelled_streams(), 1);
}

/// What a replica sends ahead counts against what the key's last admission
/// left, so a burst cannot send more ahead than the key had room for.
#[tokio::test]
async fn sending_ahead_takes_from_what_the_last_admission_left() {
    let cluster = Cluster::new().await;
    let app = TestApp::spawn_with(cluster.options().env("LEASE_TOKENS", "8")).await;
    let body = json!({"model": MODEL, "stream": false, "messages": [{"role": "user", "content": "hi"}]});
    let remaining = |resp: &reqwest::Response, kind: &str| -> u64 {
        resp.headers()[format!("x-ratelimit-remaining-{kind}").as_str()].to_str().unwrap().parse().unwrap()
    };
    let quota = &app.state.quota;

    let (by_requests, key) = app.create_key(json!({"name": "r", "daily_request_limit": 3})).await;
    assert!(!quota.may_send_ahead(by_requests, || 0), "a key new to the replica is admitted first");
    let resp = app.post("/api/chat", &key, body.clone()).send().await.unwrap();
    assert_eq!(remaining(&resp, "requests"), 2);
    assert!(quota.may_send_ahead(by_requests, || 0));
    assert!(quota.may_send_ahead(by_requests, || 0));
    assert!(!quota.may_send_ahead(by_requests, || 0), "only two requests were left");

    let (by_tokens, key) = app.create_key(json!({"name": "t", "daily_token_limit": 10_000})).await;
    let resp = app.post("/api/chat", &key, body.clone()).send().await.unwrap();
    let left = remaining(&resp, "tokens");
    assert!(left > 1000, "{left}");
    assert!(!quota.may_send_ahead(by_tokens, || left - 7), "the prompt and one lease (8) must fit");
    assert!(quota.may_send_ahead(by_tokens, || left - 8));
    assert!(!quota.may_send_ahead(by_tokens, || 0), "nothing was left for another lease");
}

/// A request sent ahead whose upstream answers before its admission: the
/// relay reads the answer meanwhile, and the client gets it, metered and
/// settled against the admission's reservation, not the stand-in.
#[tokio::test]
async fn an_answer_read_before_its_admission_came_is_served_and_settled_once_admitted() {
    let cluster = Cluster::new().await;
    let (slow, app) = behind_redis_proxy(&cluster, |o| o).await;
    let (id, key) = app.create_key(json!({"name": "k", "daily_token_limit": 100_000})).await;
    let body = json!({"model": MODEL, "stream": false, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(app.post("/api/chat", &key, body.clone()).send().await.unwrap().status(), 200, "admitted first: the key is new here");
    app.settled().await;
    let periods = app.state.quota.periods();
    let usage = || async { app.state.quota.store.usage(id, &periods.day, &periods.month).await.unwrap().0.unwrap() };
    let before = usage().await;

    // Redis answers slowly; the mock at once: the answer is in long before the admission.
    slow.set_delay(Duration::from_millis(100));
    let ollama_total = |v: &Value| v["prompt_eval_count"].as_u64().unwrap() + v["eval_count"].as_u64().unwrap();
    let v: Value = app.post("/api/chat", &key, body.clone()).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["message"]["content"], crate::mock::reply_text(12));
    assert_eq!(v["done_reason"], "stop");
    let mut used = ollama_total(&v);
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let resp = app.post("/api/chat", &key, stream_body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-ratelimit-remaining-tokens"));
    let lines = crate::common::ndjson(&resp.text().await.unwrap());
    let text: String = lines.iter().filter_map(|l| l["message"]["content"].as_str()).collect();
    assert_eq!(text, crate::mock::reply_text(12));
    assert_eq!(lines.last().unwrap()["done_reason"], "stop");
    used += ollama_total(lines.last().unwrap());
    let v: Value = app.post("/v1/chat/completions", &key, chat(MODEL, "hi")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], crate::mock::reply_text(12));
    used += v["usage"]["total_tokens"].as_u64().unwrap();

    app.settled().await;
    let after = usage().await;
    assert_eq!(after.net_requests(), before.net_requests() + 3);
    assert_eq!(after.tokens(), before.tokens() + used, "charged what was used");
    assert_eq!(after.reserved, 0, "the admissions' reservations were settled");
    assert_eq!(app.mock.state.requests(), 4);
}

/// The key ran low on another replica after this one last admitted it: the
/// admission of a request sent ahead leaves less room than the relay assumed
/// while it read the answer. The client gets what it would have got had the
/// relay waited: the answer cut where the key ran out, not a token more.
/// With a lease of 8 the relay reads past the assumed room (the prompt and
/// one lease) and waits for the admission there.
#[tokio::test]
async fn an_admission_with_less_room_than_assumed_cuts_the_answer_where_the_key_runs_out() {
    cut_where_the_key_runs_out(8, 1).await;
}

/// As above, but with a lease of 64 all 20 tokens fit the assumed room: the
/// relay reads the whole answer, and makes a non-stream client's answer,
/// before the admission comes. That answer must not be the one sent.
#[tokio::test]
async fn an_answer_complete_before_an_admission_with_less_room_is_cut_where_the_key_runs_out() {
    cut_where_the_key_runs_out(64, 10).await;
}

/// Replica A admits a key while it has room; replica B then answers
/// `answers_on_b` requests, which leave the prompt and 3 tokens; A's next
/// request goes ahead of its admission, with a 20-token answer.
async fn cut_where_the_key_runs_out(lease: u64, answers_on_b: u64) {
    let cluster = Cluster::new().await;
    let lease = lease.to_string();
    let (slow, a) = behind_redis_proxy(&cluster, |o| o.env("LEASE_TOKENS", &lease)).await;
    let b = TestApp::spawn_with(cluster.options().env("MIGRATE_ON_START", "false").env("OLLAMA_URL", &a.mock.url).env("LEASE_TOKENS", &lease)).await;
    a.mock.state.set_reply_tokens(20);
    // The whole answer in one write: the relay has all of it at once and
    // reads past the room the admission will leave before it comes.
    a.mock.state.set_one_write(true);
    let body = json!({"model": MODEL, "stream": false, "messages": [{"role": "user", "content": "hi"}]});
    let prompt = llm_quota::tokens::count_chat_prompt(&body);
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let (_, probe) = a.create_key(json!({"name": "probe"})).await;
    let answer: Value = a.post("/api/chat", &probe, body.clone()).send().await.unwrap().json().await.unwrap();
    let whole = answer["prompt_eval_count"].as_u64().unwrap() + answer["eval_count"].as_u64().unwrap();
    assert_eq!(answer["prompt_eval_count"], prompt);
    for stream in [false, true] {
        // Room for the whole answers, and then for the prompt and 3 tokens.
        let limit = (1 + answers_on_b) * whole + prompt + 3;
        let (id, key) = a.create_key(json!({"name": format!("k{stream}"), "daily_token_limit": limit})).await;
        assert_eq!(a.post("/api/chat", &key, body.clone()).send().await.unwrap().status(), 200);
        for _ in 0..answers_on_b {
            assert_eq!(b.post("/api/chat", &key, body.clone()).send().await.unwrap().status(), 200);
        }
        settle_all(&[&a, &b]).await;
        // (This takes from that room, and leaves enough for the next request.)
        let bound = llm_quota::tokens::prompt_bound(false, &body);
        assert!(a.state.quota.may_send_ahead(id, || bound), "replica A still sees room for the prompt's bound and a lease");

        slow.set_delay(Duration::from_millis(100));
        let resp = a.post("/api/chat", &key, if stream { stream_body.clone() } else { body.clone() }).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        let (content, last) = if stream {
            let lines = crate::common::ndjson(&text);
            (lines.iter().filter_map(|l| l["message"]["content"].as_str()).collect::<String>(), lines.last().unwrap().clone())
        } else {
            let v: Value = serde_json::from_str(&text).unwrap();
            (v["message"]["content"].as_str().unwrap().to_string(), v)
        };
        // The words that fit in 3 tokens.
        let (mut fits, mut n) = (String::new(), 0);
        for word in (0..).map(crate::mock::reply_word) {
            let t = llm_quota::tokens::count_text(word);
            if n + t > 3 {
                break;
            }
            (n, fits) = (n + t, fits + word);
        }
        assert_eq!(content, fits, "stream {stream}: three tokens were left");
        assert_eq!(last["done_reason"], "length");
        assert_eq!(last["eval_count"], n);
        slow.set_delay(Duration::ZERO);
        settle_all(&[&a, &b]).await;
        let periods = a.state.quota.periods();
        let (day, _) = a.state.quota.store.usage(id, &periods.day, &periods.month).await.unwrap();
        let day = day.unwrap();
        assert_eq!((day.tokens(), day.reserved), (limit - 3 + n, 0), "stream {stream}: charged what was delivered, within the limit");
    }
}

#[tokio::test]
async fn redis_down_means_503_in_bounded_time_and_recovery_without_restart() {
    let cluster = Cluster::new().await;
    let (redis, app) = behind_redis_proxy(&cluster, |o| o).await;
    let (_, key) = app.key("k").await;
    assert_eq!(app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap().status(), 200);
    // The next request may go to the upstream ahead of its admission (the
    // key had room); a long stream shows that it is cancelled, not served.
    app.mock.state.set_chunk_delay(Duration::from_millis(200));
    redis.cut();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let resp = client.post(format!("{}/v1/chat/completions", app.proxy)).bearer_auth(&key).json(&chat(MODEL, "hi")).send().await.expect("answered, not hung");
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "api_error");
    assert_eq!(v["error"]["message"], "quota store unavailable, try again shortly");
    let resp = client.post(format!("{}/api/chat", app.proxy)).bearer_auth(&key).json(&chat(MODEL, "hi")).send().await.expect("answered");
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"error": "quota store unavailable, try again shortly"}));
    let ready = app.http.get(format!("{}/readyz", app.proxy)).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let mock = &app.mock.state;
    mock.wait_until("every upstream request ended", |m| m.completed_streams() + m.cancelled_streams() == m.requests()).await;
    assert_eq!(mock.completed_streams(), 1, "nothing was served unmetered");
    assert!(mock.requests() <= 2, "only the request sent ahead reached the upstream, then the key was admitted first");
    mock.set_chunk_delay(Duration::ZERO);
    redis.restore();
    assert_eq!(app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap().status(), 200);
}

/// A store that answers too late (or a replica too busy to read the answer
/// in time) is a 503 of its own, not "unavailable".
#[tokio::test]
async fn a_quota_store_that_answers_too_late_gets_a_503_that_says_so() {
    let cluster = Cluster::new().await;
    let (redis, app) = behind_redis_proxy(&cluster, |o| o.env("REDIS_TIMEOUT", "200ms")).await;
    let (id, key) = app.key("k").await;
    redis.set_delay(Duration::from_millis(500));
    let resp = app.post("/v1/chat/completions", &key, chat(MODEL, "hi")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "api_error");
    assert_eq!(v["error"]["message"], "quota store did not answer in time, try again shortly");
    // the next call opens a new connection, which is just as slow
    let resp = app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"error": "quota store did not answer in time, try again shortly"}));
    assert_eq!(app.mock.state.requests(), 0);

    // The first admission's command still reaches Redis, late, and runs
    // there; the gateway gives it back: the 503 costs nothing.
    // Read straight from Redis, past the slowed-down connection.
    let direct = llm_quota::quota::redis::RedisStore::connect(&cluster.redis_url, &cluster.prefix, Duration::from_secs(2), Duration::from_secs(60))
        .await
        .unwrap();
    let periods = app.state.quota.periods();
    let day = || async { direct.usage(id, &periods.day, &periods.month).await.unwrap().0.unwrap_or_default() };
    eventually("the late admission to reach Redis", || async {
        let d = day().await;
        if d.requests > 0 { Ok(()) } else { Err(d) }
    })
    .await;
    redis.set_delay(Duration::ZERO);
    let d = eventually("the late admission to be given back", || async {
        let d = day().await;
        if d.net_requests() == 0 && d.reserved == 0 { Ok(d) } else { Err(d) }
    })
    .await;
    assert_eq!((d.requests, d.tokens()), (1, 0), "one late admission, given back, no tokens");
    assert_eq!(app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn quota_failure_mode_open_serves_unmetered_while_redis_is_down() {
    let cluster = Cluster::new().await;
    let (redis, app) = behind_redis_proxy(&cluster, |o| o.env("QUOTA_FAILURE_MODE", "open")).await;
    let (_, key) = app.key("k").await;
    redis.cut();
    let resp = app.post("/api/chat", &key, json!({"model": MODEL, "stream": false, "messages": [{"role": "user", "content": "hi"}]})).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["done"], true);
}

#[tokio::test]
async fn postgres_down_keeps_cached_keys_serving_and_loses_no_usage() {
    let cluster = Cluster::new().await;
    let pg_addr = crate::common::test_postgres_url().rsplit('@').next().unwrap().to_string();
    let pg = TcpProxy::start(&pg_addr).await;
    let db_name = cluster.database_url.rsplit('/').next().unwrap().to_string();
    let via_proxy = format!("postgres://postgres@{}/{db_name}", pg.addr);
    let app = TestApp::spawn_with(cluster.options().env("DATABASE_URL", &via_proxy)).await;
    let (id, key) = app.key("k").await;
    let body = json!({"model": MODEL, "prompt": "x", "stream": false});
    assert_eq!(app.post("/api/generate", &key, body.clone()).send().await.unwrap().status(), 200);
    pg.cut();
    // even an entry that must be revalidated is served while the database is away
    app.state.keys.clear();
    for _ in 0..3 {
        assert_eq!(app.post("/api/generate", &key, body.clone()).send().await.unwrap().status(), 200, "a cached key keeps working");
    }
    settle_all(&[&app]).await;
    assert!(app.state.flush().await.is_err(), "the flush cannot reach PostgreSQL");
    pg.restore();
    // the pool notices the broken connections and reconnects
    eventually("the flush to catch up after PostgreSQL came back", || app.state.flush()).await;
    let db = cluster.db().await;
    let periods = app.state.quota.periods();
    let pg_day = db.load_bucket(&BucketRef { key_id: id, period: "day", bucket: periods.day.clone() }).await.unwrap();
    assert_eq!(pg_day.requests, 4);
    let (redis_day, _) = app.state.quota.store.usage(id, &periods.day, &periods.month).await.unwrap();
    assert_eq!(pg_day.tokens(), redis_day.unwrap().tokens());
    assert_eq!(db.event_totals(id).await.unwrap().0, 4, "no usage event was lost");
}

#[tokio::test]
async fn the_migrate_subcommand_prepares_a_database() {
    let cluster = Cluster::new().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-quota"))
        .arg("migrate")
        .env("DATABASE_URL", &cluster.database_url)
        .env("LOG_FILE", "off")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let db = cluster.db().await;
    assert!(db.list_keys().await.unwrap().is_empty(), "api_keys exists after `llm-quota migrate`");
    // a replica that must not migrate starts against the prepared database
    let app = TestApp::spawn_with(cluster.options().env("MIGRATE_ON_START", "false")).await;
    app.key("k").await;
}
