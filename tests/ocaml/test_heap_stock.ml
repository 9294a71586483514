(* Ordinary OCaml mutation of heap values inside [modify] with the runtime's
   own [caml_modify] (the "stock" one), not the replacement of Debian's
   netsys.outofheap, which every native program linking netmulticore gets.

   Which one runs is decided by the link: dune's bytecode executables (and
   the toplevel) run under /usr/bin/ocamlrun, whose caml_modify is the
   runtime's (the .o of netsys.outofheap only enters -custom links); native
   ones get the replacement. The test does not trust that: [probe] finds
   out by behaviour which caml_modify this process runs, and the stock
   test is SKIPPED (never passes silently) when it is not the stock one.
   Built and run twice (dune): test_heap_stock.bc (stock: the case under
   test) and test_heap_stock.exe (netsys's: the control).

   Why the stock one is safe with our heaps: docs/design-heap.md, 1.3. *)

module H = Shmpool_netmcore.Netmcore_heap
module M = Shmpool_netmcore.Netmcore_mempool

(* Which caml_modify runs here: store a young private value into a field
   of a heap value (a program error, done once, on a block nothing
   reaches, and undone at once), then run a minor GC. The stock
   caml_modify records the field in the remembered set, so the minor GC
   writes the promoted address into it, and the field equals the (also
   updated) local root; netsys's does not record it, and the field keeps
   the dead minor-heap address. Only addresses are compared. *)
let probe h =
  H.modify h (fun m ->
      let cell = Obj.repr (H.add m (ref 0)) in
      let young = Sys.opaque_identity (Bytes.make 3 'y') in
      Obj.set_field cell 0 (Obj.repr young);
      Gc.minor ();
      let stock = Obj.field cell 0 == Obj.repr young in
      Obj.set_field cell 0 (Obj.repr 0);
      if stock then `Stock else `Replaced)

type root = {
  mutable n : int;
  items : string array;
  mutable lst : int list;
  mutable pair : int * string;
  mutable fl : float;
  mutable link : string option;
}

type holder = { mutable held : string; also : int list }

(* Test-only, to show the test can fail: SHMPOOL_TEST_BREAK=young makes
   one round store a private young string into a heap field (the program
   error Rule 2 forbids), as a broken [add] that returned its argument
   would (the model expects that string there, so only the damage it
   causes, or the escape check, can fail the test). *)
let broken = Sys.getenv_opt "SHMPOOL_TEST_BREAK" = Some "young"

let workload () =
  let pool = M.create_mempool (32 * 1024 * 1024) in
  Fun.protect ~finally:(fun () -> M.unlink_mempool pool) @@ fun () ->
  let before = M.stats pool in
  let h =
    H.create_heap pool 65536
      { n = 0; items = Array.make 50 ""; lst = []; pair = (0, ""); fl = 0.; link = None }
  in
  (* every escaping pointer the Debug check of modify finds is counted *)
  let escapes = ref 0 in
  let saved = !Netlog.Debug.current_dlogger in
  Netlog.Debug.current_dlogger := (fun md _ -> if md = "Netmcore_heap" then incr escapes);
  H.Debug.enable := true;
  Fun.protect ~finally:(fun () ->
      H.Debug.enable := false;
      Netlog.Debug.current_dlogger := saved)
  @@ fun () ->
  let how = probe h in
  (* private holders of heap values: an old (major) array, young records *)
  let priv = Array.make 10 "" in
  let young = ref [] in
  let model = Array.make 50 "" in
  let rounds = 600 in
  for i = 1 to rounds do
    H.modify h (fun m ->
        let r = H.root h in
        let s = H.add m (Printf.sprintf "item %d" i) in
        r.items.(i mod 50) <- s;                (* heap value into a heap array *)
        r.n <- i;                               (* immediate into a heap record *)
        r.lst <- H.add m [ i; i + 1; i + 2 ];  (* a heap list *)
        r.pair <- H.add m (i, s);               (* a copy sharing nothing private *)
        r.fl <- H.add m (float i);              (* a boxed float: a heap value *)
        r.link <- H.add_some m r.items.((i + 1) mod 50);
        if broken && i = rounds / 2 then
          r.items.(0) <- Sys.opaque_identity (String.make 5 'x');
        (* private garbage, and the runtime's GCs, while the heap fields
           just written are live *)
        ignore (Sys.opaque_identity (Array.init 50 string_of_int));
        if i mod 7 = 0 then Gc.minor ();
        if i mod 101 = 0 then Gc.compact ();
        if i mod 37 = 0 then Gc.full_major ();
        (* heap values into private data, from inside modify *)
        priv.(i mod 10) <- s;
        young := { held = s; also = r.lst } :: (match !young with a :: b :: _ -> [ a; b ] | l -> l));
    model.(i mod 50) <- Printf.sprintf "item %d" i;
    if broken && i = rounds / 2 then model.(0) <- "xxxxx";
    ignore (Sys.opaque_identity (List.init 200 (fun k -> string_of_int (k + i))));
    if i mod 3 = 0 then Gc.minor ();
    if i mod 10 = 0 then Gc.full_major ();
    if i mod 50 = 0 then (H.gc h; Gc.compact ());
    (* contents after the round *)
    let r = H.root h in
    if r.n <> i then Alcotest.failf "round %d: n = %d" i r.n;
    Array.iteri
      (fun k s -> if s <> model.(k) then Alcotest.failf "round %d: items.(%d) = %S, not %S" i k s model.(k))
      r.items;
    if r.lst <> [ i; i + 1; i + 2 ] then Alcotest.failf "round %d: list" i;
    if r.pair <> (i, model.(i mod 50)) then Alcotest.failf "round %d: pair" i;
    if r.fl <> float i then Alcotest.failf "round %d: float %g" i r.fl;
    if r.link != Some r.items.((i + 1) mod 50) && r.link <> Some r.items.((i + 1) mod 50) then
      Alcotest.failf "round %d: option" i;
    (* the private holders still point at the very heap values *)
    if priv.(i mod 10) != r.items.(i mod 50) then Alcotest.failf "round %d: private array" i;
    (match !young with
     | y :: _ -> if y.held != r.items.(i mod 50) || y.also != r.lst then Alcotest.failf "round %d: young holder" i
     | [] -> assert false)
  done;
  Alcotest.(check int) "no private value escaped into the heap" 0 !escapes;
  H.destroy h;
  Alcotest.(check bool) "destroy restored the pool" true (M.stats pool = before);
  how

let t_stock () =
  if Sys.backend_type = Sys.Native then
    (* the control: which one runs is reported, both must pass *)
    match workload () with
    | `Stock -> print_endline "native: stock caml_modify"
    | `Replaced -> print_endline "native: netsys.outofheap's caml_modify"
  else begin
    (* probe first, on a heap of its own: skip before the workload *)
    let pool = M.create_mempool (4 * 1024 * 1024) in
    let how =
      Fun.protect ~finally:(fun () -> M.unlink_mempool pool) @@ fun () ->
      let h = H.create_heap pool 4096 (ref 0) in
      let how = probe h in
      H.destroy h;
      how
    in
    match how with
    | `Replaced ->
        let line = "SKIPPED: test_heap_stock.bc: this bytecode run does not use the stock caml_modify\n" in
        prerr_string line;
        (match Sys.getenv_opt "SHMPOOL_SKIP_LOG" with
         | Some f ->
             let oc = open_out_gen [ Open_append; Open_creat ] 0o644 f in
             output_string oc line;
             close_out oc
         | None -> ())
    | `Stock -> (
        match workload () with
        | `Stock -> print_endline "bytecode: stock caml_modify"
        | `Replaced -> Alcotest.fail "caml_modify changed between two probes")
  end

let () =
  Alcotest.run "netmcore_heap_stock_caml_modify"
    [ ("stock", [ Alcotest.test_case "mutations inside modify under minor/major GCs and compaction" `Quick t_stock ]) ]
