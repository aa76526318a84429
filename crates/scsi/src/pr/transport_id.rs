//! See the module documentation of [`crate::pr`].
