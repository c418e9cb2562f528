//! The quota behaviour suite: written once against the `QuotaStore` trait
//! and run against every store (`suite!` at the bottom), so the in-process
//! and the Redis store are held to the very same semantics.

use std::sync::Arc;

use llm_quota::quota::{Admit, AdmitRequest, BucketRef, Charge, LimitKind, Limits, QuotaStore, ReservationRef, Usage};

const DAY: &str = "2026-11-27";
const MONTH: &str = "2026-11";
const NOW: i64 = 1_800_000_000_000;

fn req(key_id: i64, id: &str, limits: Limits, prompt: u64) -> AdmitRequest {
    AdmitRequest {
        key_id,
        day: DAY.into(),
        month: MONTH.into(),
        limits,
        prompt_tokens: prompt,
        lease_tokens: 256,
        reservation_id: id.into(),
        expires_at_ms: NOW + 60_000,
    }
}

fn resv(key_id: i64, id: &str) -> ReservationRef {
    ReservationRef { key_id, id: id.into(), day: DAY.into(), month: MONTH.into() }
}

async fn seed_fresh<S: QuotaStore>(s: &S, key_id: i64) {
    for (period, bucket) in [("day", DAY), ("month", MONTH)] {
        s.seed(&BucketRef { key_id, period, bucket: bucket.into() }, Usage::default()).await.unwrap();
    }
}

/// Admit after seeding; panics unless granted.
async fn admit_ok<S: QuotaStore>(s: &S, r: &AdmitRequest) -> u64 {
    match s.admit(r).await.unwrap() {
        Admit::Granted { held, .. } => held,
        other => panic!("expected a grant for {}, got {other:?}", r.reservation_id),
    }
}

async fn usage<S: QuotaStore>(s: &S, key_id: i64) -> (Usage, Usage) {
    let (d, m) = s.usage(key_id, DAY, MONTH).await.unwrap();
    (d.expect("day bucket"), m.expect("month bucket"))
}

fn tokens(daily: Option<u64>, monthly: Option<u64>) -> Limits {
    Limits { daily_tokens: daily, monthly_tokens: monthly, ..Limits::default() }
}

fn requests(daily: Option<u64>, monthly: Option<u64>) -> Limits {
    Limits { daily_requests: daily, monthly_requests: monthly, ..Limits::default() }
}

pub async fn missing_buckets_are_reported_then_seeded_without_overwriting<S: QuotaStore>(s: S) {
    let r = req(1, "a", Limits::default(), 10);
    match s.admit(&r).await.unwrap() {
        Admit::Missing(m) => assert_eq!(m.len(), 2, "{m:?}"),
        other => panic!("expected Missing, got {other:?}"),
    }
    let day = BucketRef { key_id: 1, period: "day", bucket: DAY.into() };
    let month = BucketRef { key_id: 1, period: "month", bucket: MONTH.into() };
    let persisted = Usage { requests: 5, refunds: 1, prompt_tokens: 100, completion_tokens: 50, reserved: 0 };
    s.seed(&day, persisted).await.unwrap();
    s.seed(&month, persisted).await.unwrap();
    // a second seed (another replica) must not overwrite live totals
    s.seed(&day, Usage::default()).await.unwrap();
    admit_ok(&s, &r).await;
    let (d, m) = usage(&s, 1).await;
    assert_eq!((d.requests, d.refunds, d.tokens()), (6, 1, 150));
    assert_eq!(m.requests, 6);
}

pub async fn admission_counts_the_request_and_holds_prompt_plus_one_lease<S: QuotaStore>(s: S) {
    seed_fresh(&s, 1).await;
    let held = admit_ok(&s, &req(1, "a", tokens(Some(1000), None), 10)).await;
    assert_eq!(held, 10 + 256);
    let (d, m) = usage(&s, 1).await;
    assert_eq!((d.requests, d.reserved, d.tokens()), (1, 266, 0));
    assert_eq!((m.requests, m.reserved), (1, 266));
}

pub async fn the_first_lease_is_capped_by_what_is_left<S: QuotaStore>(s: S) {
    seed_fresh(&s, 1).await;
    let held = admit_ok(&s, &req(1, "a", tokens(Some(100), None), 10)).await;
    assert_eq!(held, 100);
    let granted = s.lease(&resv(1, "a"), &tokens(Some(100), None), 256, NOW + 60_000).await.unwrap();
    assert_eq!(granted, 0, "nothing left to lease");
}

pub async fn leases_grow_the_reservation_up_to_the_limit<S: QuotaStore>(s: S) {
    seed_fresh(&s, 1).await;
    let l = tokens(None, Some(600));
    admit_ok(&s, &req(1, "a", l, 10)).await; // 266
    assert_eq!(s.lease(&resv(1, "a"), &l, 256, NOW + 60_000).await.unwrap(), 256); // 522
    assert_eq!(s.lease(&resv(1, "a"), &l, 256, NOW + 60_000).await.unwrap(), 78); // 600
    assert_eq!(s.lease(&resv(1, "a"), &l, 256, NOW + 60_000).await.unwrap(), 0);
    let (d, m) = usage(&s, 1).await;
    assert_eq!((d.reserved, m.reserved), (600, 600));
    // another request cannot even get its prompt in
    match s.admit(&req(1, "b", l, 1)).await.unwrap() {
        Admit::Rejected { limit, .. } => assert_eq!(limit, LimitKind::MonthlyTokens),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

pub async fn settlement_replaces_the_reservation_with_real_usage<S: QuotaStore>(s: S) {
    seed_fresh(&s, 1).await;
    admit_ok(&s, &req(1, "a", Limits::default(), 10)).await;
    s.settle(&resv(1, "a"), Charge { prompt_tokens: 12, completion_tokens: 40, refund_request: false }).await.unwrap();
    let (d, m) = usage(&s, 1).await;
    assert_eq!((d.requests, d.prompt_tokens, d.completion_tokens, d.reserved), (1, 12, 40, 0));
    assert_eq!(m.tokens(), 52);
    // settling twice changes nothing
    s.settle(&resv(1, "a"), Charge { prompt_tokens: 12, completion_tokens: 40, refund_request: false }).await.unwrap();
    assert_eq!(usage(&s, 1).await.0.tokens(), 52);
}

pub async fn a_refund_gives_the_request_and_the_reservation_back<S: QuotaStore>(s: S) {
    seed_fresh(&s, 1).await;
    let l = requests(Some(1), None);
    admit_ok(&s, &req(1, "a", l, 10)).await;
    s.settle(&resv(1, "a"), Charge { prompt_tokens: 0, completion_tokens: 0, refund_request: true }).await.unwrap();
    let (d, _) = usage(&s, 1).await;
    assert_eq!((d.requests, d.refunds, d.net_requests(), d.reserved, d.tokens()), (1, 1, 0, 0, 0));
    admit_ok(&s, &req(1, "b", l, 10)).await;
}

pub async fn request_limits_reject_exactly_at_the_limit_and_count_nothing<S: QuotaStore>(s: S) {
    seed_fresh(&s, 1).await;
    let l = requests(Some(2), Some(3));
    admit_ok(&s, &req(1, "a", l, 1)).await;
    admit_ok(&s, &req(1, "b", l, 1)).await;
    match s.admit(&req(1, "c", l, 1)).await.unwrap() {
        Admit::Rejected { limit, day, .. } => {
            assert_eq!(limit, LimitKind::DailyRequests);
            assert_eq!(day.requests, 2);
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(usage(&s, 1).await.0.requests, 2, "a rejection counts nothing");
}

pub async fn the_monthly_limit_applies_when_the_daily_one_has_room<S: QuotaStore>(s: S) {
    seed_fresh(&s, 1).await;
    let month = BucketRef { key_id: 1, period: "month", bucket: MONTH.into() };
    // a fresh day in a month that already used 3 requests and 990 tokens
    let key2 = 2;
    s.seed(&BucketRef { key_id: key2, period: "day", bucket: DAY.into() }, Usage::default()).await.unwrap();
    s.seed(&BucketRef { key_id: key2, ..month.clone() }, Usage { requests: 3, prompt_tokens: 990, ..Usage::default() }).await.unwrap();
    let reject = |r: Admit| match r {
        Admit::Rejected { limit, .. } => limit,
        other => panic!("expected a rejection, got {other:?}"),
    };
    let l = Limits { daily_requests: Some(10), monthly_requests: Some(3), ..Limits::default() };
    assert_eq!(reject(s.admit(&req(key2, "a", l, 1)).await.unwrap()), LimitKind::MonthlyRequests);
    let l = Limits { daily_tokens: Some(10_000), monthly_tokens: Some(1000), ..Limits::default() };
    assert_eq!(reject(s.admit(&req(key2, "b", l, 11)).await.unwrap()), LimitKind::MonthlyTokens);
    // all or nothing: the day bucket was not touched by either rejection
    let (d, _) = s.usage(key2, DAY, MONTH).await.unwrap();
    assert_eq!(d.unwrap(), Usage::default());
    // exactly what is left still fits, with no lease
    match s.admit(&req(key2, "c", l, 10)).await.unwrap() {
        Admit::Granted { held, .. } => assert_eq!(held, 10),
        other => panic!("expected a grant, got {other:?}"),
    }
}

pub async fn a_prompt_larger_than_what_is_left_is_rejected<S: QuotaStore>(s: S) {
    seed_fresh(&s, 1).await;
    let l = tokens(Some(100), None);
    match s.admit(&req(1, "a", l, 101)).await.unwrap() {
        Admit::Rejected { limit, .. } => assert_eq!(limit, LimitKind::DailyTokens),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(admit_ok(&s, &req(1, "b", l, 100)).await, 100);
}

pub async fn lapsed_reservations_are_charged_what_they_held<S: QuotaStore>(s: S) {
    seed_fresh(&s, 1).await;
    let l = tokens(Some(10_000), None);
    admit_ok(&s, &req(1, "a", l, 10)).await; // holds 266, lapses at NOW + 60 s
    assert_eq!(s.expire(NOW + 30_000, &[1]).await.unwrap(), 0);
    assert_eq!(s.expire(NOW + 61_000, &[1]).await.unwrap(), 1);
    let (d, _) = usage(&s, 1).await;
    assert_eq!((d.reserved, d.prompt_tokens, d.completion_tokens), (0, 10, 256));
    // the late settle of a lapsed reservation changes nothing, and it cannot lease
    assert_eq!(s.lease(&resv(1, "a"), &l, 256, NOW + 120_000).await.unwrap(), 0);
    s.settle(&resv(1, "a"), Charge { prompt_tokens: 10, completion_tokens: 5, refund_request: false }).await.unwrap();
    assert_eq!(usage(&s, 1).await.0.tokens(), 266);
}

/// A reservation that holds nothing (an empty prompt, no lease) settles,
/// and lapses, like any other, and the key's next admission works. (Redis:
/// `-held` for 0 is `-0`, which HINCRBY refuses as "not an integer".)
pub async fn a_reservation_that_holds_nothing_settles_and_lapses<S: QuotaStore>(s: S) {
    seed_fresh(&s, 1).await;
    let l = Limits::default();
    let mut empty = req(1, "empty", l, 0);
    empty.lease_tokens = 0;
    assert_eq!(admit_ok(&s, &empty).await, 0);
    s.settle(&resv(1, "empty"), Charge { prompt_tokens: 0, completion_tokens: 0, refund_request: false }).await.unwrap();
    let mut lapsing = req(1, "lapsing", l, 0);
    lapsing.lease_tokens = 0;
    assert_eq!(admit_ok(&s, &lapsing).await, 0);
    assert_eq!(s.expire(NOW + 61_000, &[1]).await.unwrap(), 1, "the settled one is gone, the other lapses");
    admit_ok(&s, &req(1, "later", l, 10)).await;
    let (d, _) = usage(&s, 1).await;
    assert_eq!((d.requests, d.reserved, d.tokens()), (3, 10 + 256, 0));
}

pub async fn a_lease_renews_the_reservation<S: QuotaStore>(s: S) {
    seed_fresh(&s, 1).await;
    let l = Limits::default();
    admit_ok(&s, &req(1, "a", l, 10)).await;
    s.lease(&resv(1, "a"), &l, 1, NOW + 120_000).await.unwrap();
    assert_eq!(s.expire(NOW + 61_000, &[1]).await.unwrap(), 0, "renewed by the lease");
    assert_eq!(usage(&s, 1).await.0.tokens(), 0);
    assert_eq!(s.expire(NOW + 121_000, &[1]).await.unwrap(), 1);
}

/// Admission leaves lapsed reservations to `expire` (the flusher's round):
/// one weighs the same against the limits before it is charged as after,
/// so the admissions in between get the same answers.
pub async fn a_lapsed_reservation_weighs_the_same_before_and_after_expiry<S: QuotaStore>(s: S) {
    seed_fresh(&s, 1).await;
    let l = tokens(Some(300), None);
    admit_ok(&s, &req(1, "a", l, 10)).await; // holds 266, lapses at NOW + 60 s
    // whenever it comes (an admission knows no clock): "a" weighs 266,
    // lapsed or not, so 34 are left, enough for the 10-token prompt
    assert_eq!(admit_ok(&s, &req(1, "b", l, 10)).await, 34);
    let (d, _) = usage(&s, 1).await;
    assert_eq!((d.reserved, d.prompt_tokens, d.completion_tokens), (300, 0, 0));
    assert_eq!(s.expire(NOW + 61_000, &[1]).await.unwrap(), 2, "\"b\" lapses at NOW + 60 s too");
    let (d, _) = usage(&s, 1).await;
    assert_eq!((d.reserved, d.prompt_tokens, d.completion_tokens), (0, 20, 280));
    assert_eq!(d.committed_tokens(), 300, "charged what they held");
    let refused = s.admit(&req(1, "c", l, 10)).await.unwrap();
    assert!(matches!(refused, Admit::Rejected { limit: LimitKind::DailyTokens, .. }), "{refused:?}");
}

pub async fn usage_is_charged_to_the_buckets_of_admission<S: QuotaStore>(s: S) {
    seed_fresh(&s, 1).await;
    admit_ok(&s, &req(1, "a", Limits::default(), 10)).await;
    // midnight passes; the next day's bucket starts empty
    let next = "2026-11-28";
    s.seed(&BucketRef { key_id: 1, period: "day", bucket: next.into() }, Usage::default()).await.unwrap();
    s.settle(&resv(1, "a"), Charge { prompt_tokens: 10, completion_tokens: 20, refund_request: false }).await.unwrap();
    assert_eq!(usage(&s, 1).await.0.tokens(), 30);
    let (d, _) = s.usage(1, next, MONTH).await.unwrap();
    assert_eq!(d.unwrap().tokens(), 0);
}

pub async fn dirty_buckets_are_handed_out_once_and_again_after_a_failed_flush<S: QuotaStore>(s: S) {
    seed_fresh(&s, 1).await;
    assert!(s.take_dirty(&[1]).await.unwrap().is_empty(), "seeding is not a change");
    admit_ok(&s, &req(1, "a", Limits::default(), 10)).await;
    let dirty = s.take_dirty(&[1]).await.unwrap();
    assert_eq!(dirty.len(), 2);
    assert!(dirty.iter().all(|(_, u)| u.requests == 1));
    assert!(s.take_dirty(&[1]).await.unwrap().is_empty());
    let refs: Vec<_> = dirty.into_iter().map(|(r, _)| r).collect();
    s.mark_dirty(&refs).await.unwrap();
    assert_eq!(s.take_dirty(&[1]).await.unwrap().len(), 2);
    // a settlement changes both buckets again, and so does a lapse
    s.settle(&resv(1, "a"), Charge { prompt_tokens: 10, completion_tokens: 5, refund_request: false }).await.unwrap();
    let dirty = s.take_dirty(&[1]).await.unwrap();
    assert_eq!(dirty.len(), 2, "{dirty:?}");
    assert!(dirty.iter().all(|(_, u)| u.tokens() == 15 && u.reserved == 0), "{dirty:?}");
    admit_ok(&s, &req(1, "b", Limits::default(), 10)).await;
    s.take_dirty(&[1]).await.unwrap();
    assert_eq!(s.expire(NOW + 61_000, &[1]).await.unwrap(), 1);
    let dirty = s.take_dirty(&[1]).await.unwrap();
    assert_eq!(dirty.len(), 2, "{dirty:?}");
    assert!(dirty.iter().all(|(_, u)| u.tokens() == 15 + 266 && u.reserved == 0), "{dirty:?}");
}

pub async fn keys_do_not_share_buckets<S: QuotaStore>(s: S) {
    seed_fresh(&s, 1).await;
    seed_fresh(&s, 2).await;
    let l = requests(Some(1), None);
    admit_ok(&s, &req(1, "a", l, 1)).await;
    admit_ok(&s, &req(2, "b", l, 1)).await;
}

/// The invariant under concurrency: many tasks admit, lease token by token
/// and settle (some refund, some stop early); charged never passes a limit.
pub async fn concurrent_clients_never_overshoot<S: QuotaStore>(s: S) {
    let s = Arc::new(s);
    seed_fresh(&*s, 1).await;
    let l = Limits { daily_tokens: Some(5_000), monthly_tokens: Some(6_000), daily_requests: Some(40), monthly_requests: Some(1000) };
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..3u64 {
                let id = format!("r{i}-{round}");
                let mut r = req(1, &id, l, 20 + i % 7);
                r.lease_tokens = 32;
                let Admit::Granted { mut held, .. } = s.admit(&r).await.unwrap() else { continue };
                let want = 50 + (i * 37 + round * 11) % 400;
                let mut used = r.prompt_tokens;
                while used < r.prompt_tokens + want {
                    if used + 1 > held {
                        let g = s.lease(&resv(1, &id), &l, 32, NOW + 60_000).await.unwrap();
                        if g == 0 {
                            break;
                        }
                        held += g;
                    }
                    used += 1;
                    if used % 64 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                let refund = i % 9 == 0 && round == 0;
                let charge = if refund {
                    Charge { prompt_tokens: 0, completion_tokens: 0, refund_request: true }
                } else {
                    Charge { prompt_tokens: r.prompt_tokens, completion_tokens: used - r.prompt_tokens, refund_request: false }
                };
                s.settle(&resv(1, &id), charge).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (d, _) = usage(&*s, 1).await;
    assert_eq!(d.reserved, 0, "every reservation was settled");
    assert!(d.net_requests() <= 40, "requests {} > 40", d.net_requests());
    // A refund that came after every other attempt leaves its request free
    // (the clients had given up by then); taken now, one at a time, the key
    // ends exactly at its limit: no admission was lost or counted twice.
    for n in 0.. {
        let id = format!("top-up-{n}");
        let mut r = req(1, &id, l, 0);
        r.lease_tokens = 0;
        if !matches!(s.admit(&r).await.unwrap(), Admit::Granted { .. }) {
            break;
        }
        assert!(n < 40, "a top-up request past the limit was admitted");
        s.settle(&resv(1, &id), Charge { prompt_tokens: 0, completion_tokens: 0, refund_request: false }).await.unwrap();
    }
    let (d, m) = usage(&*s, 1).await;
    assert_eq!(d.net_requests(), 40, "the request limit is reached exactly");
    assert!(d.tokens() <= 5_000, "day tokens {} > 5000", d.tokens());
    assert!(m.tokens() <= 6_000);
}

#[macro_export]
macro_rules! quota_suite {
    ($name:ident, $make:expr) => {
        mod $name {
            use $crate::quota_suite as q;
            macro_rules! case {
                ($case:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $case() {
                        let (store, _cleanup) = $make.await;
                        q::$case(store).await
                    }
                };
            }
            case!(missing_buckets_are_reported_then_seeded_without_overwriting);
            case!(admission_counts_the_request_and_holds_prompt_plus_one_lease);
            case!(the_first_lease_is_capped_by_what_is_left);
            case!(leases_grow_the_reservation_up_to_the_limit);
            case!(settlement_replaces_the_reservation_with_real_usage);
            case!(a_refund_gives_the_request_and_the_reservation_back);
            case!(request_limits_reject_exactly_at_the_limit_and_count_nothing);
            case!(the_monthly_limit_applies_when_the_daily_one_has_room);
            case!(a_prompt_larger_than_what_is_left_is_rejected);
            case!(lapsed_reservations_are_charged_what_they_held);
            case!(a_reservation_that_holds_nothing_settles_and_lapses);
            case!(a_lease_renews_the_reservation);
            case!(a_lapsed_reservation_weighs_the_same_before_and_after_expiry);
            case!(usage_is_charged_to_the_buckets_of_admission);
            case!(dirty_buckets_are_handed_out_once_and_again_after_a_failed_flush);
            case!(keys_do_not_share_buckets);
            case!(concurrent_clients_never_overshoot);
        }
    };
}

quota_suite!(memory_store, async { (llm_quota::quota::memory::MemoryStore::new(), ()) });

quota_suite!(redis_store, async {
    let prefix = format!("lqsuite-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let store = llm_quota::quota::redis::RedisStore::connect(
        &crate::common::test_redis_url(),
        &prefix,
        std::time::Duration::from_millis(500),
        std::time::Duration::from_secs(60),
    )
    .await
    .expect("Redis reachable for tests (scripts/test.sh starts it)");
    (store, crate::common::RedisKeys(prefix))
});
