//! Stub until the certs branch lands.
pub enum CertMode {
    SelfManaged,
    External,
}
pub struct CertSettings {
    pub mode: CertMode,
    pub namespace: String,
    pub secret: String,
    pub configuration: String,
    pub hosts: Vec<String>,
    pub leaf_validity: std::time::Duration,
    pub ca_validity: std::time::Duration,
}
