//! A connection to a single Redis or to Redis Cluster, for the store and the invalidation queue.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, ScriptInvocation, Value};

use super::{duration_ms, keys, Ack};

/// A single Redis or a Redis Cluster: every command goes through either the same way
/// ([`ConnectionLike`]); only what must reach one node ([`wait`](Self::wait)) tells them apart.
/// Cloning is cheap (both are handles on a shared connection).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    pub(crate) async fn invoke<T: FromRedisValue>(
        &self,
        inv: &ScriptInvocation<'_>,
    ) -> redis::RedisResult<T> {
        inv.invoke_async(&mut self.clone()).await
    }

    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> redis::RedisResult<T> {
        cmd.query_async(&mut self.clone()).await
    }

    pub(crate) async fn pipe<T: FromRedisValue>(&self, pipe: &Pipeline) -> redis::RedisResult<T> {
        pipe.query_async(&mut self.clone()).await
    }

    pub(crate) async fn load(&self, script: &redis::Script) -> redis::RedisResult<String> {
        script.load_async(&mut self.clone()).await
    }

    /// `WAIT replicas timeout` on the connection to the master of `tenant`'s slot (where its
    /// raises went); answers how many replicas acknowledged.
    pub(super) async fn wait(&self, tenant: &str, ack: Ack) -> redis::RedisResult<usize> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(ack.replicas).arg(duration_ms(ack.timeout));
        match self {
            Self::Single(c) => cmd.query_async(&mut c.clone()).await,
            Self::Cluster(c) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = Route::new(keys::slot(tenant), SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                let reply = c.clone().route_command(cmd, routing).await?;
                Ok(usize::from_redis_value(reply)?)
            }
        }
    }
}
