(* OCamlnet's heap values (white headers, pool registered as value area) under Gc.compact *)
let pool = Netmcore_mempool.create_mempool (16 * 1024 * 1024)
let r = Netmcore_ref.sref pool (String.make 10_000 'a')
let (start, len) = let (_, m, _) = match (Netmcore.get_resource pool)#repr with `Posix_shm_preallocated_sc (a, m, c) -> (a, m, c) | _ -> assert false in
  (Netsys_mem.memory_address m, Bigarray.Array1.dim m)
let in_pool v = let a = Netsys_mem.obj_address (Obj.repr v) in a >= start && a < Nativeint.add start (Nativeint.of_int len)
let () =
  (* the segfault leaves the pool behind: probe.sh unlinks it by this name *)
  Printf.printf "shm %s\n%!" (Netmcore_mempool.shm_name pool);
  let mode = Sys.argv.(1) in
  let keep = ref (Netmcore_ref.deref_ro r) in
  Printf.printf "held value in pool: %b, colour white: %b\n%!" (in_pool !keep) (Netsys_mem.color (Obj.repr !keep) = Netsys_mem.White);
  if mode = "one" then begin
    Gc.compact ();
    Printf.printf "after one Gc.compact: held value in pool: %b%!" (in_pool !keep);
    Printf.printf ", length %d\n%!" (String.length !keep)
  end else begin
    (* the issue's loop: assign 10 KB values, let OCaml compact on its own *)
    for i = 1 to 5000 do
      Netmcore_ref.assign r (String.make 10_000 (Char.chr (97 + i mod 26)));
      keep := Netmcore_ref.deref_ro r;
      if i mod 500 = 0 then Printf.printf "iteration %d, compactions %d\n%!" i (Gc.quick_stat ()).compactions
    done;
    print_endline "loop survived"
  end
