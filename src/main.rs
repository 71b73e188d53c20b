fn main() {
    println!("ur4rec-engine: under construction");
}
