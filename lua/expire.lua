-- expire: charge the key's lapsed reservations. Returns how many.
return sweep_all()
