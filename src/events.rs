//! Cluster mode: admin changes reach every replica through Redis pub/sub.
//! Any replica that changes keys or settings publishes on `<prefix>:events`;
//! every replica evicts its key and settings caches when it hears one. A
//! replica whose subscription broke evicts on reconnect (it may have missed
//! events) and the key cache's TTL bounds staleness either way.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::AppState;

pub struct ClusterEvents {
    client: redis::Client,
    channel: String,
    publisher: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

impl ClusterEvents {
    pub fn new(url: &str, prefix: &str) -> anyhow::Result<ClusterEvents> {
        Ok(ClusterEvents {
            client: redis::Client::open(url)?,
            channel: format!("{prefix}:events"),
            publisher: tokio::sync::Mutex::new(None),
        })
    }

    pub async fn publish(&self) {
        let mut guard = self.publisher.lock().await;
        let result = async {
            if guard.is_none() {
                *guard = Some(self.client.get_multiplexed_async_connection().await?);
            }
            let c = guard.as_mut().expect("just set");
            redis::cmd("PUBLISH").arg(&self.channel).arg("evict").query_async::<i64>(c).await
        };
        match tokio::time::timeout(Duration::from_secs(1), result).await {
            Ok(Ok(_)) => {}
            other => {
                *guard = None;
                tracing::warn!(outcome = ?other.map(|r| r.err()), "could not publish an admin change; other replicas catch up by TTL");
            }
        }
    }

    /// Listen until `stop`; reconnects with backoff.
    pub async fn listen(self: std::sync::Arc<Self>, state: AppState, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let session = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&self.channel).await?;
                // Whatever happened while we were not listening is unknown.
                state.evict_caches().await;
                let mut messages = pubsub.on_message();
                while messages.next().await.is_some() {
                    state.evict_caches().await;
                }
                Ok::<_, redis::RedisError>(())
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                r = session => {
                    tracing::warn!(error = ?r.err(), "admin-change subscription ended; reconnecting");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
