fn main() {
    println!("store benchmark: see later commit");
}
