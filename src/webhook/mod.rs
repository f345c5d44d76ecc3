pub mod certs;
pub mod rotation;
pub mod tls;
