//! plexusd.
