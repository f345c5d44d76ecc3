//! Reliability and security campaign: faults survived, bad input refused, nothing leaked,
//! nothing lost. Its own test binary, so restarting the apiserver or etcd here disturbs no
//! other test. Every scenario holds [`SERIAL`], so none runs while another restarts a
//! control-plane process.

#[allow(dead_code)]
#[path = "../integration/support.rs"]
mod support;

mod bad_input;
mod faults;
mod load;
mod ownership;

/// Held by every scenario in this binary.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
