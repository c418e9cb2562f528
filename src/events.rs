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
    /// This replica's id: its own messages need no second eviction.
    me: String,
    publisher: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

impl ClusterEvents {
    pub fn new(url: &str, prefix: &str) -> anyhow::Result<ClusterEvents> {
        Ok(ClusterEvents {
            client: redis::Client::open(url)?,
            channel: format!("{prefix}:events"),
            me: uuid::Uuid::new_v4().simple().to_string(),
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
            redis::cmd("PUBLISH").arg(&self.channel).arg(&self.me).query_async::<i64>(c).await
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
        let mut reconnect = false;
        loop {
            let session = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&self.channel).await?;
                if reconnect {
                    // Whatever happened while we were not listening is unknown.
                    state.evict_caches().await;
                }
                reconnect = true;
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    if msg.get_payload::<String>().ok().as_deref() != Some(self.me.as_str()) {
                        state.evict_caches().await;
                    }
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
