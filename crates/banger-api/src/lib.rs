//! banger's API for its clients: typed proxies of `org.banger`'s D-Bus interfaces (the
//! XML in `dbus/` is their contract). The CLI uses them, and so will the E2B facade and the
//! containerd shim: clients of the API, never of the daemon's internals.

pub mod proxy;
