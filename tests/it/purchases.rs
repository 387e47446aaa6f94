//! Purchases.
