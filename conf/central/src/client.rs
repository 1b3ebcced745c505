//! An HTTPS client of plexusd (and of any Kubernetes-style API server).
