//! Test helpers: temporary repositories and trees. (PostgreSQL and S3
//! helpers join here as the issues that need them land.)
