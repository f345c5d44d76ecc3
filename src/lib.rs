//! regcred keeps `kubernetes.io/dockerconfigjson` pull Secrets correct from
//! `RegistryCredential` resources. See ARCHITECTURE.md for how the pieces fit.

pub mod admin;
pub mod controller;
pub mod crd;
pub mod dockerconfig;
pub mod doctor;
mod error;
pub mod http;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod owned;
pub mod pacing;
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
pub mod verify;
pub mod webhook;

pub use error::Error;

#[cfg(test)]
pub(crate) mod test_support {
    use base64::{Engine, engine::general_purpose::STANDARD};

    /// Fails if a `Debug` output shows `secret` in any form it travels in: as text, as base64
    /// (Secret data, the `auth` field) or as the byte list `Debug` prints for a `Vec<u8>` (what
    /// `ByteString` shows).
    #[track_caller]
    pub fn assert_hidden(shown: &str, secret: &str) {
        let bytes = format!("{:?}", secret.as_bytes());
        for form in [secret.to_string(), STANDARD.encode(secret), bytes.trim_matches(['[', ']']).to_string()] {
            assert!(!shown.contains(&form), "{form:?} is shown in {shown}");
        }
    }
}
