//! Switches the PostgreSQL tests on (`cfg(pg_tests)`) when the build sees
//! `PROJECTIONIST_TEST_PG_URL`; without it they are reported as ignored, never
//! as passed.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(pg_tests)");
    println!("cargo::rerun-if-env-changed=PROJECTIONIST_TEST_PG_URL");
    if std::env::var_os("PROJECTIONIST_TEST_PG_URL").is_some() {
        println!("cargo::rustc-cfg=pg_tests");
    }
}
