//! Redis and Redis Cluster store (work in progress).
