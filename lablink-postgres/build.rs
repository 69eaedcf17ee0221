// `sqlx::migrate!` and `query_file!` read these directories at compile time; without this a
// new migration or an edited statement would not rebuild the crate.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=sql");
}
