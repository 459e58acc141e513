//! The `cachecore-gateway` binary, run as a user runs it.
