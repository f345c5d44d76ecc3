//! regcred keeps `kubernetes.io/dockerconfigjson` pull Secrets correct from
//! `RegistryCredential` resources. See ARCHITECTURE.md for how the pieces fit.

pub mod admin;
pub mod controller;
pub mod crd;
pub mod dockerconfig;
mod error;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod registry;
pub mod render;
pub mod secret;
pub mod service_account;
pub mod shutdown;
pub mod source;
pub mod state;
pub mod status;
pub mod telemetry;

pub use error::Error;
