//! temporary
fn main() {
    let p = std::env::args().nth(1).unwrap();
    match kiln_frontend::import(std::path::Path::new(&p)) {
        Ok(m) => print!("{}", kiln_ir::print(&m.module)),
        Err(e) => eprintln!("error: {e}"),
    }
}
