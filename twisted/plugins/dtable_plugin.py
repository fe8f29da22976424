from twisted.application.service import ServiceMaker

dtable = ServiceMaker("dtable", "dtable.tap", "An encrypted, replicated table of JSON objects.", "dtable")
