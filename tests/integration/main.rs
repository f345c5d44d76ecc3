//! Integration tests against a real kube-apiserver, etcd and kube-controller-manager, a real
//! registry and the real regcred binary. One control plane and one controller serve the
//! whole binary; every test works in its own namespace, so they run in parallel.

mod support;

mod acr;
mod admin;
mod alerts;
mod conflict;
mod core;
mod doctor;
mod ecr;
mod errors;
mod fanout;
mod gcr;
mod hostile;
mod leader;
mod lifecycle;
mod logs;
mod node;
mod privilege;
mod quiet;
mod rbac;
mod registry_pull;
mod scoped;
mod service_accounts;
mod sources;
mod trace;
mod upgrade;
mod validation;
mod verify;
mod webhook;
