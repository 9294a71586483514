module Netmcore_mempool = Mempool

let shmpool = Mempool.shmpool
